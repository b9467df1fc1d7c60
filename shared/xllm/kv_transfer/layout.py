"""KvLayout: where a KV block's bytes sit in an engine's pool, as (offset, length) runs.

The pool (engine/kv_cache.py) is one contiguous tensor [L, 2, num_slots, Hkv, D] with
slot = block_id * block_size + offset. So one block is 2L runs, one per (layer, K/V)
plane, each `block_size * Hkv * D * itemsize` bytes long:

    plane p = 2 * layer + kv            (kv: 0 = K, 1 = V)
    offset(p, block) = p * plane_bytes + block * block_bytes_per_plane

Blocks with consecutive ids are adjacent within every plane, so a run of consecutive
blocks is still 2L runs, just longer. Two pools may hold different numbers of blocks
(plane_bytes differs) but must agree on everything else to exchange blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KvLayout:
    num_layers: int
    num_blocks: int
    block_size: int
    token_bytes: int
    """Bytes of one token's K (or V) in one layer: Hkv * D * itemsize."""

    @classmethod
    def of(cls, tensor: torch.Tensor, block_size: int) -> KvLayout:
        """The layout of a KV pool tensor [L, 2, num_slots, Hkv, D] (must be contiguous)."""
        assert tensor.dim() == 5 and tensor.shape[1] == 2 and tensor.is_contiguous()
        num_layers, _, num_slots, num_kv_heads, head_dim = tensor.shape
        assert num_slots % block_size == 0
        return cls(
            num_layers,
            num_slots // block_size,
            block_size,
            num_kv_heads * head_dim * tensor.element_size(),
        )

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

    def runs(self, block_id: int, num_blocks: int = 1) -> list[tuple[int, int]]:
        """(offset, length) of blocks [block_id, block_id + num_blocks) in every plane."""
        assert block_id >= 0 and block_id + num_blocks <= self.num_blocks
        start = block_id * self.plane_block_bytes
        length = num_blocks * self.plane_block_bytes
        return [(p * self.plane_bytes + start, length) for p in range(2 * self.num_layers)]


def pair_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Group block pairs src[i] -> dst[i] into (src_start, dst_start, count) runs where both
    sides are consecutive, so each run moves as 2L writes instead of 2L per block."""
    assert len(src) == len(dst), (len(src), len(dst))
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def block_segments(
    src: KvLayout, dst: KvLayout, src_blocks: list[int], dst_blocks: list[int]
) -> list[tuple[int, int, int]]:
    """(src_offset, dst_offset, length) byte segments copying `src_blocks` into `dst_blocks`."""
    if not src.compatible_with(dst):
        raise ValueError(f"KV layouts cannot exchange blocks: {src} vs {dst}")
    segments: list[tuple[int, int, int]] = []
    for s, d, n in pair_runs(src_blocks, dst_blocks):
        for (so, length), (do, _) in zip(src.runs(s, n), dst.runs(d, n), strict=True):
            segments.append((so, do, length))
    return segments
