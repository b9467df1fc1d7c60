"""KvTiers: the slower KV tiers behind the device pool — host memory, then disk.

Rule (report §3.4): a block cached on the device is also in host memory. Every full prefix
block the block manager caches is copied to a host block at the end of the step that
computed it (write-through), so evicting it from the device loses nothing. A host block
leaves host memory only when it is not on the device (nor being loaded); when disk is
configured it is then written to a file (lazily: only on host eviction), so disk holds what
fell out of host memory. Host memory must hold at least the device pool (`Engine` checks),
which is what lets host eviction always find a block that is not on the device.

Loading back: a request whose prompt misses the device cache but hits these tiers is held
out of the scheduler while its blocks are copied in (disk -> host -> device) on a worker
thread, as long as that is cheaper than recomputing them (`load_pays`). The engine keeps
stepping the other requests meanwhile. The blocks being written are taken from the device
pool for the load (`BlockManager.reserve_for_load`: referenced, in no block table, so no
forward pass touches them); when the copy is done they become ordinary cached free blocks
(`finish_load`) and the request is queued, to find them in the prefix cache like any hit.

Threads: all bookkeeping runs on the engine's thread. The single worker thread only moves
bytes, in submission order: into device blocks held for a load, into host blocks of hashes
pinned for the load, out of host blocks pinned for the load, and into or out of disk files
(a spill writes a copy made on the engine's thread, so the host block can be reused at once).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections import Counter, OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from xllm.config import EngineConfig
from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_cache import KVCache
from xllm.engine.sequence import Sequence
from xllm.protocol.stats import KvTierCounters, KvTierStats

if TYPE_CHECKING:
    from xllm.engine.kv_store import KvStore

HOST, DISK, STORE = "host", "disk", "store"
SLOWEST_FIRST = (STORE, DISK, HOST)

log = logging.getLogger(__name__)


@dataclass
class PendingLoad:
    seq: Sequence | None
    """The request waiting for the load; None once it was aborted."""
    block_ids: list[int]
    block_hashes: list[int]
    future: Future
    tiers: list[str] = field(default_factory=list)
    """The tier each block comes from."""


def make_tiers(config: EngineConfig, kv: KVCache, block_manager: BlockManager) -> KvTiers:
    """The tiers `config` asks for (`--host-kv-gb` > 0), behind the pool `kv`."""
    per_block = kv.nbytes // kv.num_blocks
    num_host = int(config.host_kv_gb * 2**30) // per_block
    if num_host < kv.num_blocks:
        raise ValueError(
            f"--host-kv-gb holds {num_host} blocks, fewer than the KV pool's {kv.num_blocks}: "
            "host memory must hold every block cached on the device"
        )
    store = None
    if config.kv_store_master:
        from xllm.engine.kv_store import KvStore, namespace

        space = namespace(config.model, kv.tensor.dtype, kv.block_size)
        segment = int(config.kv_store_segment_gb * 2**30)
        store = KvStore(config.kv_store_master, config.kv_store_host, segment, space)
    bandwidth = {HOST: config.host_kv_gbps, DISK: config.disk_kv_gbps, STORE: config.kv_store_gbps}
    return KvTiers(
        kv,
        block_manager,
        num_host,
        config.disk_kv_dir,
        int(config.disk_kv_gb * 2**30) // per_block,
        bandwidth,
        store,
        config.kv_store_put_min_reuse,
    )


def load_pays(
    blocks_by_tier: dict[str, int],
    bytes_per_block: int,
    block_size: int,
    prefill_seconds_per_token: float,
    bandwidth_gbps: dict[str, float],
) -> bool:
    """Is copying these blocks in cheaper than recomputing their tokens? Nothing measured
    yet (0 s/token): yes — a memory or disk read beats a forward pass on what we run."""
    if prefill_seconds_per_token <= 0:
        return True
    load = sum(n * bytes_per_block / (bandwidth_gbps[t] * 1e9) for t, n in blocks_by_tier.items())
    recompute = sum(blocks_by_tier.values()) * block_size * prefill_seconds_per_token
    return load < recompute


class KvTiers:
    def __init__(
        self,
        kv: KVCache,
        block_manager: BlockManager,
        num_host_blocks: int,
        disk_dir: str = "",
        num_disk_blocks: int = 0,
        bandwidth_gbps: dict[str, float] | None = None,
        store: KvStore | None = None,
        store_min_reuse: int = 0,
    ):
        self.kv = kv
        self.bm = block_manager
        self.block_size = kv.block_size
        layers, two, _, heads, dim = kv.tensor.shape
        self.block_shape = (layers, two, kv.block_size, heads, dim)
        self.host_tensor = torch.empty(
            layers, two, num_host_blocks * kv.block_size, heads, dim, dtype=kv.tensor.dtype
        )
        self.bytes_per_block = self.host_tensor[:, :, : kv.block_size].numel() * kv.tensor.itemsize
        self.host: OrderedDict[int, int] = OrderedDict()
        """block hash -> host block, least recently used first."""
        self.free_host_blocks = list(range(num_host_blocks))
        self.disk: OrderedDict[int, None] = OrderedDict()
        """Hashes with a file in `disk_dir`, least recently used first."""
        self.num_disk_blocks = num_disk_blocks if disk_dir else 0
        self.disk_dir = ""
        if self.num_disk_blocks:
            os.makedirs(disk_dir, exist_ok=True)
            # A folder of our own: instances may share `disk_dir`; removed when we go.
            self.disk_dir = tempfile.mkdtemp(prefix="xllm-kv-", dir=disk_dir)
            weakref.finalize(self, shutil.rmtree, self.disk_dir, True)
        self.pinned: Counter[int] = Counter()
        """Hashes a load in flight reads or writes: not evicted from host or disk."""
        self.bandwidth_gbps = bandwidth_gbps or {HOST: 10.0, DISK: 1.0, STORE: 1.0}
        self.store = store
        self.store_min_reuse = store_min_reuse
        """0: put every block cached into the store; N: put a block once N requests reused it."""
        self.reuse: Counter[int] = Counter()
        self.puts: list[tuple[int, Future]] = []
        self.put_worker = ThreadPoolExecutor(1, thread_name_prefix="xllm-kv-put") if store else None
        self.loads: list[PendingLoad] = []
        self.events: list[tuple[str, int, str]] = []
        """("stored" | "evicted", block hash, tier) of the host and disk tiers, in order."""
        self.stats = {HOST: KvTierCounters(), DISK: KvTierCounters(), STORE: KvTierCounters()}
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="xllm-kv-tiers")
        block_manager.stored_log = []

    @property
    def num_loading(self) -> int:
        return len(self.loads)

    # -- write-through (end of every step) ------------------------------------------------

    def write_through(self) -> None:
        """Copy the blocks cached since the last call into host memory. Called before
        anything can overwrite them: at the start of a step (before its forward pass) and
        before a load reserves device blocks."""
        stored, self.bm.stored_log = self.bm.stored_log, []
        pairs = []
        for block_hash, block_id in stored:
            if self.bm.cached_blocks.get(block_hash) != block_id:
                continue  # evicted since (a load took the block): its KV is gone
            if block_hash in self.host:
                self.host.move_to_end(block_hash)
                continue
            host_block = self._host_block()
            if host_block is None:
                continue  # every host block is on the device or loading (host < device pool)
            self._host_insert(block_hash, host_block)
            pairs.append((block_id, host_block))
        if pairs:
            _copy(self.kv.tensor, self.host_tensor, pairs, self.block_size)
        if self.store is not None:
            if self.store_min_reuse == 0:
                for block_hash, _ in stored:
                    self._put(block_hash)
            self._collect_puts()

    def flush(self) -> None:
        """Write through and wait for the puts in flight (an instance about to go idle or
        stop; tests)."""
        self.write_through()
        if self.put_worker is not None:
            self.put_worker.submit(lambda: None).result()
            self._collect_puts()

    def _put(self, block_hash: int) -> None:
        """Put a block in host memory into the store, on the put worker (from a copy: the
        host block may be reused before the put runs)."""
        assert self.store is not None and self.put_worker is not None
        host_block = self.host.get(block_hash)
        if host_block is None:
            return
        start = host_block * self.block_size
        data = self.host_tensor[:, :, start : start + self.block_size].clone()
        self.puts.append((block_hash, self.put_worker.submit(self.store.put, block_hash, data)))

    def _collect_puts(self) -> None:
        pending = []
        for block_hash, future in self.puts:
            if not future.done():
                pending.append((block_hash, future))
            elif future.exception() is None and future.result():
                self.stats[STORE].blocks_stored += 1
                self.events.append(("stored", block_hash, STORE))
        self.puts = pending

    # -- loading back ---------------------------------------------------------------------

    def start_load(self, seq: Sequence, prefill_seconds_per_token: float) -> bool:
        """If `seq`'s prompt prefix is in these tiers past what the device holds, and loading
        it pays, start loading it and return True: the caller queues `seq` when `poll`
        hands it back. False: nothing to load, queue it now."""
        self.write_through()  # before a reservation can evict a block not yet copied
        device_hits, hashes, tiers = self._plan(seq)
        if not hashes:
            return False
        counts = Counter(tiers)
        if not load_pays(
            counts, self.bytes_per_block, self.block_size, prefill_seconds_per_token,
            self.bandwidth_gbps,
        ):  # fmt: skip
            return False
        block_ids = self.bm.reserve_for_load(len(hashes), device_hits)
        if block_ids is None:
            return False
        self.pinned.update(hashes)
        reads = []  # (tier, hash, host block) for blocks from disk or store: into host first
        for block_hash, tier in zip(hashes, tiers, strict=True):
            if tier == HOST:
                self.host.move_to_end(block_hash)
                continue
            host_block = self._host_block()
            assert host_block is not None, "host memory smaller than the device pool"
            self._host_insert(block_hash, host_block)
            if tier == DISK:
                self.disk.move_to_end(block_hash)
            reads.append((tier, block_hash, host_block))
        pairs = [(self.host[h], b) for h, b in zip(hashes, block_ids, strict=True)]
        future = self.worker.submit(self._load, reads, pairs)
        self.loads.append(PendingLoad(seq, block_ids, hashes, future, tiers))
        return True

    def poll(self, wait: bool = False) -> list[Sequence]:
        """Finish the loads that are done (waiting up to 50 ms for one if `wait`); returns
        their requests, to be queued (aborted ones left out)."""
        if not self.loads:
            return []
        if wait:
            wait_futures(
                [p.future for p in self.loads], timeout=0.05, return_when="FIRST_COMPLETED"
            )
        ready: list[Sequence] = []
        pending = []
        for load in self.loads:
            if not load.future.done():
                pending.append(load)
                continue
            self.pinned.subtract(load.block_hashes)
            self.pinned += Counter()  # drop the zeros
            try:
                seconds = load.future.result()
            except Exception as e:
                log.warning("loading %d KV blocks failed (%s); recomputing", len(load.tiers), e)
                self.bm.release_load(load.block_ids)
                self.stats[_slowest(load.tiers)].failed_loads += 1
                for block_hash, tier in zip(load.block_hashes, load.tiers, strict=True):
                    if tier != HOST:  # its host copy may be garbage
                        self._host_remove(block_hash)
            else:
                self.bm.finish_load(load.block_ids, load.block_hashes)
                self._count(load, seconds)
            if load.seq is not None:
                ready.append(load.seq)
        self.loads = pending
        return ready

    def forget(self, seq: Sequence) -> bool:
        """`seq` was aborted: if it waits for a load, the load goes on without it (its blocks
        still land in the cache). True if it was waiting."""
        for load in self.loads:
            if load.seq is seq:
                load.seq = None
                return True
        return False

    def _plan(self, seq: Sequence) -> tuple[list[int], list[int], list[str]]:
        """(device-cached blocks of the prefix, hashes to load, their tiers), walking the
        prompt's full blocks (never the last token's) until one is in no tier."""
        device_hits, hashes, tiers = [], [], []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        chain = seq.full_block_hashes(self.block_size)[:max_blocks]
        for i, block_hash in enumerate(chain):
            block_id = self.bm.cached_blocks.get(block_hash)
            if block_id is not None:
                device_hits.append(block_id)
            elif block_hash in self.pinned:
                break  # another request's load brings it: not twice
            elif block_hash in self.host:
                hashes.append(block_hash)
                tiers.append(HOST)
            elif block_hash in self.disk:
                hashes.append(block_hash)
                tiers.append(DISK)
            else:
                if self.store is not None:  # the rest of the chain, from the cluster's store
                    rest = chain[i:]
                    rest = rest[: next((j for j, h in enumerate(rest) if h in self.pinned), None)]
                    n = self.store.leading_present(rest)
                    hashes += rest[:n]
                    tiers += [STORE] * n
                break
            if self.store is not None and self.store_min_reuse:
                self._count_reuse(block_hash)
        return device_hits, hashes, tiers

    def _count_reuse(self, block_hash: int) -> None:
        """Eager put: a block goes to the store when the `store_min_reuse`-th request reuses
        it. (The counts are forgotten wholesale now and then: a bound, not an LRU.)"""
        self.reuse[block_hash] += 1
        if self.reuse[block_hash] == self.store_min_reuse:
            self._put(block_hash)
        if len(self.reuse) > 8 * len(self.host_tensor[0, 0]) // self.block_size:
            self.reuse.clear()

    def _load(self, reads: list[tuple[str, int, int]], pairs: list[tuple[int, int]]) -> float:
        """Worker thread: disk files and store objects -> host blocks, then host blocks ->
        device blocks."""
        started = time.perf_counter()
        for tier, block_hash, host_block in reads:
            if tier == DISK:
                path = self._path(block_hash)
                data = torch.from_file(path, size=self.bytes_per_block, dtype=torch.uint8)
            else:
                assert self.store is not None
                data = self.store.get(block_hash, self.bytes_per_block)
            block = data.view(self.host_tensor.dtype).view(self.block_shape)
            start = host_block * self.block_size
            self.host_tensor[:, :, start : start + self.block_size] = block
        _copy(self.host_tensor, self.kv.tensor, pairs, self.block_size)
        return time.perf_counter() - started

    def _count(self, load: PendingLoad, seconds: float) -> None:
        for tier in load.tiers:
            self.stats[tier].hits += 1
            self.stats[tier].bytes_loaded += self.bytes_per_block
        slowest = _slowest(load.tiers)
        self.stats[slowest].load_seconds += seconds
        self.stats[slowest].num_loads += 1

    # -- host and disk bookkeeping --------------------------------------------------------

    def _host_block(self) -> int | None:
        """A free host block, spilling the least recently used block that is neither on the
        device nor pinned to disk if none is free; None if every block is."""
        if self.free_host_blocks:
            return self.free_host_blocks.pop()
        for block_hash in self.host:
            if block_hash not in self.bm.cached_blocks and block_hash not in self.pinned:
                break
        else:
            return None
        host_block = self.host[block_hash]
        self._spill(block_hash, host_block)
        self._host_remove(block_hash, free=False)
        return host_block

    def _host_insert(self, block_hash: int, host_block: int) -> None:
        self.host[block_hash] = host_block
        self.stats[HOST].blocks_stored += 1
        self.events.append(("stored", block_hash, HOST))

    def _host_remove(self, block_hash: int, free: bool = True) -> None:
        host_block = self.host.pop(block_hash)
        if free:
            self.free_host_blocks.append(host_block)
        self.stats[HOST].blocks_evicted += 1
        self.events.append(("evicted", block_hash, HOST))

    def _spill(self, block_hash: int, host_block: int) -> None:
        """Write a block leaving host memory to disk (if there is a disk tier)."""
        if not self.num_disk_blocks:
            return
        if block_hash in self.disk:
            self.disk.move_to_end(block_hash)
            return
        if len(self.disk) >= self.num_disk_blocks:
            victim = next((h for h in self.disk if h not in self.pinned), None)
            if victim is None:
                return
            del self.disk[victim]
            self.stats[DISK].blocks_evicted += 1
            self.events.append(("evicted", victim, DISK))
            self.worker.submit(os.remove, self._path(victim))
        start = host_block * self.block_size
        data = self.host_tensor[:, :, start : start + self.block_size].clone()
        self.worker.submit(_write_file, self._path(block_hash), data)
        self.disk[block_hash] = None
        self.stats[DISK].blocks_stored += 1
        self.events.append(("stored", block_hash, DISK))

    def _path(self, block_hash: int) -> str:
        return os.path.join(self.disk_dir, f"{block_hash:016x}.kv")

    def tier_stats(self) -> KvTierStats:
        """A copy of the counters (the heartbeat reads it while steps go on)."""
        return KvTierStats(**{t: copy.copy(c) for t, c in self.stats.items()})

    def drain_events(self) -> list[tuple[str, int, str]]:
        events, self.events = self.events, []
        return events

    def held(self) -> list[tuple[int, str]]:
        """(block hash, tier) of every block these tiers hold (a snapshot for the index)."""
        return [(h, HOST) for h in self.host] + [(h, DISK) for h in self.disk]

    def check_integrity(self) -> None:
        """Assert the tier invariants of the module docstring (tests call this)."""
        assert len(self.host) + len(self.free_host_blocks) == self.host_tensor.shape[2] // (
            self.block_size
        )
        assert len(set(self.host.values()) | set(self.free_host_blocks)) == len(self.host) + len(
            self.free_host_blocks
        ), "a host block is used twice"
        assert len(self.disk) <= self.num_disk_blocks
        loading = {h for load in self.loads for h in load.block_hashes}
        unwritten = {h for h, _ in self.bm.stored_log or ()}  # copied at the next step
        for block_hash in self.bm.cached_blocks:
            assert block_hash in self.host or block_hash in unwritten, f"{block_hash:x} not in host"
        for block_hash in loading:  # (it may be on the device too: computed meanwhile)
            assert block_hash in self.host, f"{block_hash:x} loading, not in host"
        assert set(self.pinned) == loading, (self.pinned, loading)

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        if self.put_worker is not None:
            self.put_worker.shutdown(wait=True)


def _slowest(tiers: list[str]) -> str:
    return next(t for t in SLOWEST_FIRST if t in tiers)


def _copy(src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]], block_size: int):
    """Copy whole blocks (every layer's K and V), `src` block -> `dst` block, in one go."""
    src_slots = _slots([s for s, _ in pairs], block_size, src.device)
    dst_slots = _slots([d for _, d in pairs], block_size, dst.device)
    dst.index_copy_(2, dst_slots, src.index_select(2, src_slots).to(dst.device))


def _slots(blocks: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    starts = torch.tensor(blocks, dtype=torch.long).unsqueeze(1) * block_size
    return (starts + torch.arange(block_size)).flatten().to(device)


def _write_file(path: str, data: torch.Tensor) -> None:
    data.contiguous().view(torch.uint8).numpy().tofile(path)
