"""KvStore: the cluster KV tier, Mooncake Store, as the engine's tiers use it.

Mooncake Store is a distributed object store: a master process (`mooncake_master`, started
by `xllm up` and by compose) keeps the index, and every client lends it a memory segment
(`--kv-store-segment-gb`) where objects live. An instance puts the full prefix blocks it
computes there, and any instance can get a block another one computed. A block is one
object, its key the model's namespace plus the block's chained hash (`prefix_hash.py`), so
one hash names the same KV everywhere the same model runs with the same block size.

Clients reach the master's RPC port and each other directly (P2P handshake, TCP): no
metadata server. Every call fails fast when the master is gone (an RPC error code or an empty
object, measured at well under a millisecond) and works again once it is back (the client
reconnects and remounts its segment itself); the tiers then fall back to recomputing.

Replicas (`--kv-store-replicas`): a put lands in that many clients' segments, but a `get`
reads only the first replica, and the master lists a dead client's segment (and the replicas
in it) until that client's lease runs out (~10 s). So when a `get` fails, `get` asks the
master for the object's replica descriptors and reads the others itself, through
`read_replica`: a one-sided read of (endpoint, address, size) that the instance injects (a
Mooncake Transfer Engine of its own, `xllm.kv_transfer.replica_reader`; the engine layer
cannot build one). Without it a failed first replica is a miss, as before.

Audit: the store evicts objects when its segments fill, and forgets them all when the master
restarts, without telling anyone. `missing` asks which of the blocks this instance put are
gone, so the tiers can report them evicted (KV events) and the kvstore index stops sending
requests here for them.

Calls block: puts and audits run on a put worker of their own, gets on the tiers' load
worker; only the existence check of a prompt's missing blocks runs on the engine's thread,
one RPC when a request arrives whose prefix the local tiers do not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LOCAL_BUFFER_BYTES = 64 << 20
"""The client's registered staging buffer for gets and puts. A batch that does not fit in it
fails whole, so puts and gets go in batches of at most `BATCH_BYTES`."""

BATCH_BYTES = LOCAL_BUFFER_BYTES // 4
"""Bytes of blocks in one put or get batch (a small model's long prefill step writes
100+ MB; a quarter of the buffer leaves room for a put and a get at once)."""


def batches(num_items: int, item_bytes: int) -> list[range]:
    """Index ranges covering `num_items` items of `item_bytes` each, `BATCH_BYTES` a batch
    (at least one item per batch)."""
    per_batch = max(1, BATCH_BYTES // max(1, item_bytes))
    return [range(i, min(i + per_batch, num_items)) for i in range(0, num_items, per_batch)]


ReadReplica = Callable[[str, int, int], "bytes | None"]
"""(transport endpoint, address, size) -> the bytes at that address of that Mooncake
client's segment; None when the read failed (its client is gone)."""


def namespace(model_dir: str, dtype: torch.dtype, block_size: int) -> str:
    """What must agree for two instances' blocks of one hash to be interchangeable: the
    model (its config.json), the KV dtype and the block size."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    text = json.dumps([config, str(dtype), block_size], sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


class KvStore:
    def __init__(
        self, master: str, host: str, segment_bytes: int, namespace: str, replicas: int = 1
    ):
        try:
            from mooncake.store import MooncakeDistributedStore, ReplicateConfig
        except ImportError as e:  # pragma: no cover - shipped with mooncake-transfer-engine
            raise RuntimeError(f"--kv-store-master needs mooncake-transfer-engine: {e}") from e
        self.prefix = f"xllm:{namespace}:"
        self.replicate = ReplicateConfig()
        self.replicate.replica_num = replicas  # best effort: fewer when fewer segments
        host = host or socket.gethostbyname(socket.gethostname())
        self.client = MooncakeDistributedStore()
        rc = self.client.setup(
            host, "P2PHANDSHAKE", segment_bytes, LOCAL_BUFFER_BYTES, "tcp", "", master
        )
        if rc != 0:
            raise RuntimeError(f"cannot join Mooncake Store at {master} (error {rc})")

        self.put_worker = ThreadPoolExecutor(1, thread_name_prefix="xllm-kv-put")
        self.puts: list[Future] = []
        self.read_replica: ReadReplica | None = None
        """Reads a block's other replicas when its first fails; injected by the instance."""
        self.replica_reads = 0
        """Blocks read from a replica other than the first (the load worker counts)."""

    def put_async(self, block_hashes: list[int], blocks: list[torch.Tensor]) -> None:
        """Put `blocks` (copies, owned by the put) on the put worker, in one batch: a step's
        new blocks cost one round trip, so the puts keep up with a long prefill."""
        if block_hashes:
            self.puts.append(self.put_worker.submit(self.put_many, block_hashes, blocks))

    def finished_puts(self, wait: bool = False) -> list[int]:
        """The hashes whose put succeeded since the last call (all queued ones if `wait`)."""
        if wait:
            self.put_worker.submit(lambda: None).result()
        done: list[int] = []
        pending = []
        for future in self.puts:
            if not future.done():
                pending.append(future)
            elif future.exception() is None:
                done += future.result()
        self.puts = pending
        return done

    def put_many(self, block_hashes: list[int], blocks: list[torch.Tensor]) -> list[int]:
        """Put worker: the blocks, in batches that fit the staging buffer; returns the
        hashes the store now holds."""
        if not blocks:
            return []
        stored: list[int] = []
        for part in batches(len(blocks), blocks[0].numel() * blocks[0].element_size()):
            keys = [self.key(block_hashes[i]) for i in part]
            data = [blocks[i].contiguous().view(torch.uint8).numpy().tobytes() for i in part]
            if self.client.put_batch(keys, data, self.replicate) == 0:
                stored += [block_hashes[i] for i in part]
                continue
            found = self.client.batch_is_exist(keys)  # some went in, or none (store gone)
            stored += [block_hashes[i] for i, f in zip(part, found, strict=False) if f == 1]
        return stored

    def key(self, block_hash: int) -> str:
        return f"{self.prefix}{block_hash:016x}"

    def leading_present(self, block_hashes: list[int]) -> int:
        """How many of `block_hashes`, from the first, the store holds (0 if unreachable)."""
        if not block_hashes:
            return 0
        found = self.client.batch_is_exist([self.key(h) for h in block_hashes])
        n = 0
        while n < len(found) and found[n] == 1:
            n += 1
        return n

    def get_many(self, block_hashes: list[int], num_bytes: int) -> list[torch.Tensor]:
        """`get` of every block, a batch per round trip: a block the batch did not bring
        (its first replica unreadable, say) is read alone, which tries the others."""
        out: list[torch.Tensor] = []
        for part in batches(len(block_hashes), num_bytes):
            got = self.client.get_batch([self.key(block_hashes[i]) for i in part])
            for i, data in zip(part, got, strict=True):
                if len(data) == num_bytes:
                    out.append(torch.frombuffer(bytearray(data), dtype=torch.uint8))
                else:
                    out.append(self.get(block_hashes[i], num_bytes))
        return out

    def get(self, block_hash: int, num_bytes: int) -> torch.Tensor:
        """The block's bytes (uint8), from its first replica or, if that read fails, from
        another; raises if it is gone, no replica can be read, or the store is unreachable."""
        key = self.key(block_hash)
        data = self.client.get(key)
        if len(data) != num_bytes and self.read_replica is not None:
            log.info("store block %s: its first replica is unreadable; trying the others", key)
            data = self._read_other_replicas(key, num_bytes) or data
        if len(data) != num_bytes:
            raise KvStoreMiss(f"block {block_hash:016x}: {len(data)} bytes, not {num_bytes}")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def _read_other_replicas(self, key: str, num_bytes: int) -> bytes | None:
        """The object from the first of its memory replicas that can be read. Every one is
        tried: the list's order need not be the one `get` tried, and a dead client's refuses
        the connection at once. (Asking for the descriptors takes a lease on the object, as
        `get` does, so the master does not reuse its memory while we read.)"""
        from mooncake.store import ReplicaStatus

        assert self.read_replica is not None
        for replica in self.client.get_replica_desc(key):
            if not replica.is_memory_replica() or replica.status != ReplicaStatus.COMPLETE:
                continue
            where = replica.get_memory_descriptor().buffer_descriptor
            if where.size != num_bytes:
                continue
            data = self.read_replica(where.transport_endpoint, where.buffer_address, num_bytes)
            if data is not None and len(data) == num_bytes:
                self.replica_reads += 1
                log.info("store block %s read from %s", key, where.transport_endpoint)
                return data
        return None

    def audit_async(self, block_hashes: list[int]) -> Future:
        """`missing(block_hashes)` on the put worker (after the puts queued before it)."""
        return self.put_worker.submit(self.missing, block_hashes)

    def missing(self, block_hashes: list[int]) -> list[int]:
        """Those of `block_hashes` the store says it no longer holds. An unreachable store
        answers with error codes, not "no": nothing is reported missing then."""
        found = self.client.batch_is_exist([self.key(h) for h in block_hashes])
        return [h for h, f in zip(block_hashes, found, strict=False) if f == 0]

    def close(self) -> None:
        self.put_worker.shutdown(wait=True)
        self.client.close()


class KvStoreMiss(RuntimeError):
    """A block the store listed could not be read (evicted since, or the master is down)."""


class StoreAudit:
    """Which of the blocks this instance put in the store (`held`) are still there: every
    `interval` seconds one `missing` call on the put worker, its answer collected by the
    next `poll` (the engine's thread: no step waits for the RPC)."""

    def __init__(self, store: KvStore, interval: float):
        self.store = store
        self.interval = interval
        """Seconds between audits; 0 = never."""
        self.held: set[int] = set()
        self.running: Future | None = None
        self.next_at = time.monotonic() + interval

    def stored(self, block_hashes: list[int]) -> None:
        self.held.update(block_hashes)

    def poll(self, start: bool = True) -> list[int]:
        """The hashes a finished audit found gone (dropped from `held`), and the next audit
        started if it is due (and `start`). Collect before counting newer puts: a put queued
        after an audit finishes after it, so a block put again after it was found gone is
        counted held again."""
        gone: list[int] = []
        if self.running is not None and self.running.done():
            future, self.running = self.running, None
            if future.exception() is None:
                gone = [h for h in future.result() if h in self.held]
                self.held.difference_update(gone)
        now = time.monotonic()
        if start and self.interval and self.running is None and self.held and now >= self.next_at:
            self.running = self.store.audit_async(list(self.held))
            self.next_at = now + self.interval
        return gone

    def run_now(self) -> list[int]:
        """Audit now and wait for the answer (tests, and `KvTiers.audit_store`)."""
        if self.running is None and self.held:
            self.running = self.store.audit_async(list(self.held))
        if self.running is not None:
            wait_futures([self.running])
        return self.poll(start=False)
