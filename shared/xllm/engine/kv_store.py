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

Calls block: puts run on a put worker of their own, gets on the tiers' load worker; only the
existence check of a prompt's missing blocks runs on the engine's thread, one RPC when a
request arrives whose prefix the local tiers do not hold.
"""

from __future__ import annotations

import hashlib
import json
import logging
import socket
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

log = logging.getLogger(__name__)

LOCAL_BUFFER_BYTES = 16 << 20
"""The client's registered staging buffer for gets and puts (blocks are far smaller)."""


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
        """Put worker: the batch; returns the hashes the store now holds."""
        keys = [self.key(h) for h in block_hashes]
        data = [b.contiguous().view(torch.uint8).numpy().tobytes() for b in blocks]
        if self.client.put_batch(keys, data, self.replicate) == 0:
            return list(block_hashes)
        found = self.client.batch_is_exist(keys)  # some went in, or none (store gone)
        return [h for h, f in zip(block_hashes, found, strict=False) if f == 1]

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

    def get(self, block_hash: int, num_bytes: int) -> torch.Tensor:
        """The block's bytes (uint8); raises if it is gone or the store is unreachable."""
        data = self.client.get(self.key(block_hash))
        if len(data) != num_bytes:
            raise KvStoreMiss(f"block {block_hash:016x}: {len(data)} bytes, not {num_bytes}")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def close(self) -> None:
        self.put_worker.shutdown(wait=True)
        self.client.close()


class KvStoreMiss(RuntimeError):
    """A block the store listed could not be read (evicted since, or the master is down)."""
