"""KvPeer: a KV pool as a write target — where one instance writes KV blocks into another.

The receiver (the decode instance) hands out its `KvPeer`; the sender (the prefill instance)
writes blocks into it, addressing bytes by the receiver's `KvLayout`. It travels inside
`PrefillCmd` and is the same type the transports use (`xllm.kv_transfer`), so nothing
converts between a wire form and a local form.

The layout describes a pool tensor [L, 2, num_slots, Hkv, D] with slot = block_id *
block_size + offset, one (layer, K/V) plane after another (`xllm.kv_transfer.layout` has the
byte arithmetic and builds a layout from a tensor). Two pools may hold different numbers of
blocks but must agree on everything else to exchange blocks (`compatible_with`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class KvLayout:
    """The shape of a KV pool, in what a byte copy between two pools needs."""

    num_layers: int
    """Layers of the pool; must equal the other pool's."""
    num_blocks: int
    """Blocks in the pool (may differ between the two pools)."""
    block_size: int
    """Tokens per block; must equal the other pool's."""
    token_bytes: int
    """Bytes of one token's K (or V) in one layer: Hkv * D * itemsize; must be equal."""

    @property
    def plane_block_bytes(self) -> int:
        """Bytes of one block in one (layer, K/V) plane."""
        return self.block_size * self.token_bytes

    @property
    def block_bytes(self) -> int:
        """Bytes of one block across all planes: what moving a block costs."""
        return 2 * self.num_layers * self.plane_block_bytes

    @property
    def plane_bytes(self) -> int:
        return self.num_blocks * self.plane_block_bytes

    @property
    def nbytes(self) -> int:
        return 2 * self.num_layers * self.plane_bytes

    def compatible_with(self, other: KvLayout) -> bool:
        """Blocks can move between the two pools (the number of blocks may differ)."""
        return (self.num_layers, self.block_size, self.token_bytes) == (
            other.num_layers,
            other.block_size,
            other.token_bytes,
        )


@dataclass(frozen=True, slots=True)
class KvPeer:
    """What a sender needs to write into a receiver's pool; the receiver hands it out."""

    endpoint: str
    """The receiver's transfer endpoint (Mooncake: host:rpc_port, its segment name)."""
    base_addr: int
    """Address of the receiver's registered KV pool, in its own process."""
    layout: KvLayout
    """The receiver pool's layout: where each block's bytes sit from `base_addr` on."""
