"""The slower KV tiers of a simulated instance: host memory and the cluster store, as hash
sets (no bytes), with the engine's rules (`xllm.engine.kv_tiers`).

Every block the device's prefix cache stores is written through to host memory (LRU, the
oldest hash leaves when full) and, with a cluster store, to the store, which every instance
shares and which keeps everything (Mooncake Store's capacity is not what we study). A
request whose prompt misses the device past some blocks but hits host memory, then the
store, waits while those blocks are copied in, when `kv_tier_loads.load_pays` says loading beats
recomputing; the copy lasts the blocks' bytes over the tier's bandwidth (the hardware
profile's `tier_bandwidth`), after which the blocks are ordinary device cache hits. The
scheduler sees the same tiers (`prefix_tiers`) and prices them with `tier_cost.prefix_work`.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_tier_loads import load_pays

HOST, STORE = "host", "store"


@dataclass(frozen=True, slots=True)
class TierSetup:
    """What an instance's tiers need from the cluster: the shared store, the sizes and
    bandwidths of the model on the hardware profile."""

    store: set[int] | None
    block_bytes: int
    bandwidth: Mapping[str, float]


class SimTiers:
    def __init__(
        self,
        block_manager: BlockManager,
        num_host_blocks: int,
        store: set[int] | None,
        block_bytes: int,
        bandwidth: Mapping[str, float],
    ):
        self.bm = block_manager
        self.num_host_blocks = num_host_blocks
        self.host: OrderedDict[int, None] = OrderedDict()
        self.store = store
        """The cluster store's hashes, shared by every instance (None: no store)."""
        self.block_bytes = block_bytes
        self.bandwidth = bandwidth
        self.loaded = {HOST: 0, STORE: 0}
        """Blocks loaded from each tier (instead of recomputed)."""
        block_manager.stored_log = []

    def write_through(self) -> None:
        """Copy the blocks the device cached since the last call to host (and the store)."""
        for block_hash, _ in self.bm.stored_log or ():
            self._host_add(block_hash)
            if self.store is not None:
                self.store.add(block_hash)
        self.bm.stored_log = []

    def _host_add(self, block_hash: int) -> None:
        if self.num_host_blocks <= 0:
            return
        self.host[block_hash] = None
        self.host.move_to_end(block_hash)
        while len(self.host) > self.num_host_blocks:
            self.host.popitem(last=False)

    def beyond_device(self, hashes: list[int], num_device: int, limit: int) -> tuple[int, int]:
        """(host blocks, store blocks) continuing the first `num_device` device-cached
        blocks of `hashes`, the fastest tier first, up to `limit` blocks in all."""
        i = num_device
        while i < limit and hashes[i] in self.host:
            i += 1
        num_host = i - num_device
        while self.store is not None and i < limit and hashes[i] in self.store:
            i += 1
        return num_host, i - num_device - num_host

    def prefix_tiers(self, hashes: list[int], num_device: int, limit: int) -> dict[str, int]:
        """What the kvstore would say of this instance's hit: blocks by fastest tier."""
        num_host, _ = self.beyond_device(hashes, num_device, limit)
        tiers = {"device": num_device, HOST: num_host}
        return {tier: n for tier, n in tiers.items() if n}

    def start_load(
        self, hashes: list[int], limit: int, prefill_seconds_per_token: float
    ) -> tuple[list[int], list[int], float] | None:
        """`KvTiers.start_load`: (device blocks taken, their hashes, seconds the copy lasts),
        or None when nothing is to be loaded or loading does not pay."""
        self.write_through()
        device = self.bm.cached_blocks_of(hashes, limit * self.bm.block_size + 1)
        num_host, num_store = self.beyond_device(hashes, len(device), limit)
        if not num_host + num_store:
            return None
        counts = {HOST: num_host, STORE: num_store}
        gbps = {tier: self.bandwidth[tier] / 1e9 for tier in counts}
        if not load_pays(
            counts, self.block_bytes, self.bm.block_size, prefill_seconds_per_token, gbps
        ):
            return None
        block_ids = self.bm.reserve_for_load(num_host + num_store, device)
        if block_ids is None:
            return None
        for block_hash in hashes[len(device) : len(device) + num_host]:
            self.host.move_to_end(block_hash)
        for tier, n in counts.items():
            self.loaded[tier] += n
        seconds = sum(n * self.block_bytes / self.bandwidth[t] for t, n in counts.items())
        return block_ids, hashes[len(device) : len(device) + num_host + num_store], seconds

    def finish_load(self, block_ids: list[int], block_hashes: list[int]) -> None:
        self.bm.finish_load(block_ids, block_hashes)
        for block_hash in block_hashes:  # in host memory again: the rule holds
            self._host_add(block_hash)
