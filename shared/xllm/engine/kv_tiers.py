"""KvTiers: the slower KV tiers behind the device pool — host memory, disk, the cluster store.

Rule (report §3.4): a block cached on the device is also in host memory. Every full prefix
block the block manager caches is copied to a host block at the end of the step that
computed it (write-through), so evicting it from the device loses nothing. A host block
leaves host memory only when it is not on the device (nor being loaded); when disk is
configured it is then written to a file (lazily: only on host eviction), so disk holds what
fell out of host memory. Host memory must hold at least the device pool (`Engine` checks),
which is what lets host eviction always find a block that is not on the device.

The cluster store (`kv_store.py`, Mooncake Store), when configured, gets a copy of every
block written through to host memory (or, with `store_min_reuse` N, of a block once N
requests reused it), and serves the blocks no local tier holds. What it evicts is found by
an audit every `store_audit_seconds` (`StoreAudit`) and reported as evicted.

Loading back: a request whose prompt misses the device cache but hits these tiers is held
out of the scheduler while its blocks are copied in (disk/store -> host -> device) on a worker
thread, as long as that is cheaper than recomputing them (`load_pays`). The engine keeps
stepping the other requests meanwhile. The blocks being written are taken from the device
pool for the load (`BlockManager.reserve_for_load`: referenced, in no block table, so no
forward pass touches them); when the copy is done they become ordinary cached free blocks
(`finish_load`) and the request is queued, to find them in the prefix cache like any hit.
When the pool has too few free blocks for the load (other requests hold them), a new request
waits for room, tried again every step, for at most what the load would save; recomputing
needs those blocks too, so queueing it at once would only trade the load for a recompute
(under load, a busy pool made every return to the tiers a recompute).

Threads: all bookkeeping runs on the engine's thread. The single worker thread only moves
bytes, in submission order: into device blocks held for a load, into host blocks of hashes
pinned for the load, out of host blocks pinned for the load, and into or out of disk files
(a spill writes a copy made on the engine's thread, so the host block can be reused at once).
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import TYPE_CHECKING

from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_cache import KVCache
from xllm.engine.kv_tier_loads import DISK, HOST, STORE, PendingLoad, load_pays, slowest_tier
from xllm.engine.kv_tier_pools import DiskTier, HostPool, copy_blocks
from xllm.engine.sequence import Sequence
from xllm.protocol.stats import KvTierCounters, KvTierStats

if TYPE_CHECKING:
    from xllm.engine.kv_store import KvStore, StoreAudit

log = logging.getLogger(__name__)

STARTED, NO_ROOM, NOT_WORTH = "started", "no room", "not worth it"
"""What trying to load a request's prefix came to (`KvTiers._try_load`)."""


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
        store_audit_seconds: float = 0.0,
    ):
        self.kv = kv
        self.bm = block_manager
        self.block_size = kv.block_size
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="xllm-kv-tiers")
        self.host = HostPool(kv, num_host_blocks)
        self.bytes_per_block = self.host.bytes_per_block
        self.disk = (
            DiskTier(disk_dir, num_disk_blocks, self.worker.submit)
            if disk_dir and num_disk_blocks
            else None
        )
        self.store = store
        self.audit: StoreAudit | None = None
        if store is not None:
            from xllm.engine.kv_store import StoreAudit

            self.audit = StoreAudit(store, store_audit_seconds)
        self.store_min_reuse = store_min_reuse
        """0: put every block written through into the store; N: a block once N requests
        reused it."""
        self.reuse: Counter[int] = Counter()
        self.bandwidth_gbps = bandwidth_gbps or {HOST: 10.0, DISK: 1.0, STORE: 1.0}
        self.pinned: Counter[int] = Counter()
        """Hashes a load in flight reads or writes: not evicted from host or disk."""
        self.loads: list[PendingLoad] = []
        self.waiting: list[tuple[Sequence, float]] = []
        """(request, monotonic deadline): new requests whose load found too few free blocks
        in the pool; tried again every step until the deadline (`admit`)."""
        self.prefetches: dict[str, PendingLoad] = {}
        """Reservations' loads (`prefetch`), by request id, until the reservation is made."""
        self.events: list[tuple[str, int, str]] = []
        """("stored" | "evicted", block hash, tier) of the host, disk and store tiers."""
        self.stats = {HOST: KvTierCounters(), DISK: KvTierCounters(), STORE: KvTierCounters()}
        block_manager.stored_log = []

    @property
    def num_loading(self) -> int:
        """Requests held out of the scheduler: loading, or waiting for room to load."""
        return len(self.loads) + len(self.waiting)

    # -- write-through (start of every step) ----------------------------------------------

    def write_through(self) -> None:
        """Copy the blocks cached since the last call into host memory (and put them in the
        store). Called before anything can overwrite them: at the start of a step (before
        its forward pass) and before a load reserves device blocks."""
        stored, self.bm.stored_log = self.bm.stored_log, []
        pairs = []
        for block_hash, block_id in stored:
            if self.bm.cached_blocks.get(block_hash) != block_id:
                continue  # evicted since (a load took the block): its KV is gone
            if block_hash in self.host:
                self.host.touch(block_hash)
                continue
            host_block = self._host_block()
            if host_block is None:
                continue  # every host block is on the device or loading (host < device pool)
            self._host_insert(block_hash, host_block)
            pairs.append((block_id, host_block))
        if pairs:
            copy_blocks(self.kv.tensor, self.host.tensor, pairs, self.block_size)
        if self.store is not None:
            if self.store_min_reuse == 0:
                hashes = [self.bm.blocks[block_id].block_hash for block_id, _ in pairs]
                self._put(hashes, [host_block for _, host_block in pairs])
            assert self.audit is not None
            self._count_gone(self.audit.poll())  # before newer puts (StoreAudit.poll)
            self._count_puts(self.store.finished_puts())

    def flush(self) -> None:
        """Write through and wait for the puts in flight (before going idle; tests)."""
        self.write_through()
        if self.store is not None:
            self._count_puts(self.store.finished_puts(wait=True))

    def audit_store(self) -> None:
        """Audit the store now, waiting for its answer (tests; the steps audit on a timer)."""
        if self.audit is not None:
            self.flush()
            self._count_gone(self.audit.run_now())

    def _put(self, block_hashes: list[int], host_blocks: list[int]) -> None:
        # From copies: the host blocks may be reused before the put runs.
        assert self.store is not None
        self.store.put_async(block_hashes, [self.host.block(b).clone() for b in host_blocks])

    def _count_puts(self, hashes: list[int]) -> None:
        assert self.audit is not None
        self.audit.stored(hashes)
        self.stats[STORE].blocks_stored += len(hashes)
        self.events += [("stored", h, STORE) for h in hashes]

    def _count_gone(self, hashes: list[int]) -> None:
        """Blocks this instance put that the store no longer holds."""
        self.stats[STORE].blocks_evicted += len(hashes)
        self.events += [("evicted", h, STORE) for h in hashes]

    # -- loading back ---------------------------------------------------------------------

    def start_load(self, seq: Sequence, prefill_seconds_per_token: float) -> bool:
        """If `seq`'s prompt prefix is in these tiers past what the device holds, and loading
        it pays, start loading it and return True: the caller queues `seq` when `poll`
        hands it back. False: nothing to load, or no room for it now: queue it now."""
        return self._try_load(seq, prefill_seconds_per_token)[0] == STARTED

    def admit(self, seq: Sequence, prefill_seconds_per_token: float) -> bool:
        """`start_load` for a new request, which waits for room in the pool rather than
        recompute a prefix these tiers hold: True while the tiers hold it (loading, or
        waiting: tried again by `retry_waiting`); the caller queues it when `poll` or
        `retry_waiting` hands it back. False: queue it now."""
        outcome, num_blocks = self._try_load(seq, prefill_seconds_per_token)
        if outcome == NO_ROOM:
            # Waiting longer than recomputing the blocks would take cannot pay.
            saved = num_blocks * self.block_size * prefill_seconds_per_token
            self.waiting.append((seq, time.monotonic() + saved))
        return outcome != NOT_WORTH

    def retry_waiting(self, prefill_seconds_per_token: float) -> list[Sequence]:
        """Start the waiting requests' loads that fit now (oldest first); returns those that
        waited longer than their load would save, to be queued and recomputed."""
        now, give_up, still = time.monotonic(), [], []
        for seq, deadline in self.waiting:
            outcome, _ = self._try_load(seq, prefill_seconds_per_token)
            if outcome == NO_ROOM and now < deadline:
                still.append((seq, deadline))
            elif outcome != STARTED:
                give_up.append(seq)
        self.waiting = still
        return give_up

    def _try_load(self, seq: Sequence, prefill_seconds_per_token: float) -> tuple[str, int]:
        """`start_load`: (STARTED, NO_ROOM (the pool has too few free blocks for the load
        now) or NOT_WORTH (nothing to load, or recomputing is cheaper), blocks to load)."""
        self.write_through()  # before a reservation can evict a block not yet copied
        device_hits, hashes, tiers = self._plan(seq)
        if not hashes:
            return NOT_WORTH, 0
        counts = Counter(tiers)
        if not load_pays(
            counts, self.bytes_per_block, self.block_size, prefill_seconds_per_token,
            self.bandwidth_gbps,
        ):  # fmt: skip
            return NOT_WORTH, len(hashes)
        block_ids = self.bm.reserve_for_load(len(hashes), device_hits)
        if block_ids is None:
            fits = len(hashes) + len(device_hits) < self.bm.num_blocks
            return (NO_ROOM if fits else NOT_WORTH), len(hashes)
        self.pinned.update(hashes)
        reads = []  # (tier, hash, host block) for blocks from disk or store: into host first
        for block_hash, tier in zip(hashes, tiers, strict=True):
            if tier == HOST:
                self.host.touch(block_hash)
                continue
            host_block = self._host_block()
            assert host_block is not None, "host memory smaller than the device pool"
            self._host_insert(block_hash, host_block)
            if tier == DISK:
                self.disk.touch(block_hash)
            reads.append((tier, block_hash, host_block))
        pairs = [(self.host[h], b) for h, b in zip(hashes, block_ids, strict=True)]
        future = self.worker.submit(self._load, reads, pairs)
        self.loads.append(PendingLoad(seq, block_ids, hashes, future, tiers))
        return STARTED, len(hashes)

    def poll(self, wait: bool = False) -> list[Sequence]:
        """Finish the loads that are done (waiting up to 50 ms for one if `wait`); returns
        their requests, to be queued (aborted ones left out)."""
        if not self.loads:
            return []
        if wait:
            futures = [p.future for p in self.loads]
            wait_futures(futures, timeout=0.05, return_when="FIRST_COMPLETED")
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
                self.stats[slowest_tier(load.tiers)].failed_loads += 1
                for block_hash, tier in zip(load.block_hashes, load.tiers, strict=True):
                    if tier != HOST:  # its host copy may be garbage, its file too
                        self._host_remove(block_hash)
                    if tier == DISK:
                        self._disk_remove(block_hash)
            else:
                self.bm.finish_load(load.block_ids, load.block_hashes)
                self._count(load, seconds)
            if load.seq is not None:
                ready.append(load.seq)
        self.loads = pending
        return ready

    def prefetch(self, seq: Sequence, prefill_seconds_per_token: float) -> bool:
        """`start_load` for a reservation (PD decode side), with no request waiting on it.
        True while that load is in flight: reserve once it is done. Once per request: a
        failed load is not tried again (the prefill side sends those blocks instead)."""
        load = self.prefetches.get(seq.request_id)
        if load is not None:
            if load in self.loads:
                return True
            del self.prefetches[seq.request_id]
            return False
        if not self.start_load(seq, prefill_seconds_per_token):
            return False
        self.prefetches[seq.request_id] = self.loads[-1]
        self.forget(seq)
        return True

    def forget(self, seq: Sequence) -> bool:
        """`seq` was aborted: if it waits for a load, the load goes on without it (its blocks
        still land in the cache). True if it was waiting (for a load, or for room for one)."""
        for i, (waiting, _) in enumerate(self.waiting):
            if waiting is seq:
                del self.waiting[i]
                return True
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
            elif self.disk is not None and block_hash in self.disk:
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
        if self.reuse[block_hash] == self.store_min_reuse and block_hash in self.host:
            self._put([block_hash], [self.host[block_hash]])
        if len(self.reuse) > 8 * self.host.num_blocks:
            self.reuse.clear()

    def _load(self, reads: list[tuple[str, int, int]], pairs: list[tuple[int, int]]) -> float:
        """Worker thread: disk files and store objects -> host blocks, then host blocks ->
        device blocks."""
        started = time.perf_counter()
        from_store = [(h, b) for tier, h, b in reads if tier == STORE]
        if from_store:
            assert self.store is not None
            blocks = self.store.get_many([h for h, _ in from_store], self.bytes_per_block)
            for (_, host_block), data in zip(from_store, blocks, strict=True):
                self.host.write(host_block, data)
        for tier, block_hash, host_block in reads:
            if tier == DISK:
                assert self.disk is not None
                self.host.write(host_block, self.disk.read(block_hash, self.bytes_per_block))
        copy_blocks(self.host.tensor, self.kv.tensor, pairs, self.block_size)
        return time.perf_counter() - started

    def _count(self, load: PendingLoad, seconds: float) -> None:
        for tier in load.tiers:
            self.stats[tier].hits += 1
            self.stats[tier].bytes_loaded += self.bytes_per_block
        slowest = slowest_tier(load.tiers)
        self.stats[slowest].load_seconds += seconds
        self.stats[slowest].num_loads += 1

    # -- host and disk: what to evict, what to report -------------------------------------

    def _host_block(self) -> int | None:
        """A free host block, spilling the least recently used block that is neither on the
        device nor pinned to disk if none is free; None if every block is."""
        if self.host.free:
            return self.host.free.pop()
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
        self.host.insert(block_hash, host_block)
        self.stats[HOST].blocks_stored += 1
        self.events.append(("stored", block_hash, HOST))

    def _host_remove(self, block_hash: int, free: bool = True) -> None:
        self.host.remove(block_hash, free)
        self.stats[HOST].blocks_evicted += 1
        self.events.append(("evicted", block_hash, HOST))

    def _spill(self, block_hash: int, host_block: int) -> None:
        """Write a block leaving host memory to disk (if there is a disk tier)."""
        disk = self.disk
        if disk is None:
            return
        if block_hash in disk:
            disk.touch(block_hash)
            return
        if len(disk) >= disk.num_blocks:
            victim = next((h for h in disk if h not in self.pinned), None)
            if victim is None:
                return
            self._disk_remove(victim)
        disk.add(block_hash, self.host.block(host_block).clone())
        self.stats[DISK].blocks_stored += 1
        self.events.append(("stored", block_hash, DISK))

    def _disk_remove(self, block_hash: int) -> None:
        assert self.disk is not None
        if block_hash in self.disk:
            self.disk.remove(block_hash)
            self.stats[DISK].blocks_evicted += 1
            self.events.append(("evicted", block_hash, DISK))

    # -- reporting --------------------------------------------------------------------------

    def tier_stats(self) -> KvTierStats:
        """A copy of the counters (the heartbeat reads it while steps go on)."""
        if self.store is not None:
            self.stats[STORE].replica_reads = self.store.replica_reads
        return KvTierStats(**{t: copy.copy(c) for t, c in self.stats.items()})

    def drain_events(self) -> list[tuple[str, int, str]]:
        events, self.events = self.events, []
        return events

    def held(self) -> list[tuple[int, str]]:
        """(block hash, tier) of every block the host and disk tiers hold, and of those this
        instance put in the store and last found there (for a snapshot)."""
        store = [(h, STORE) for h in self.audit.held] if self.audit is not None else []
        return [(h, HOST) for h in self.host] + [(h, DISK) for h in self.disk or ()] + store

    def check_integrity(self) -> None:
        """Assert the tier invariants of the module docstring (tests call this)."""
        self.host.check()
        assert self.disk is None or len(self.disk) <= self.disk.num_blocks
        loading = {h for load in self.loads for h in load.block_hashes}
        unwritten = {h for h, _ in self.bm.stored_log or ()}  # copied at the next step
        for block_hash in self.bm.cached_blocks:
            assert block_hash in self.host or block_hash in unwritten, f"{block_hash:x} not in host"
        for block_hash in loading:  # (it may be on the device too: computed meanwhile)
            assert block_hash in self.host, f"{block_hash:x} loading, not in host"
        assert set(self.pinned) == loading, (self.pinned, loading)

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        if self.store is not None:
            self.store.close()
