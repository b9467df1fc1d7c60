"""LoopbackTransport: KV blocks copied between two pools of one process (tests, one-process runs).

It is the `KvTransport` of `base.py` with the network taken out: a pool registers under an
endpoint name in this process's table, and a sender's write is a byte copy from its pool
into the peer's, along the same `block_segments` Mooncake writes. A closed pool leaves the
table, so a write to it fails as a write to a dead peer does.

Two ways to run:
  * `hold=False` (the default): a transfer runs inside `submit` and is over when it returns.
  * `hold=True`: transfers stay in flight until the test says so (`finish`), which makes
    every state reachable on purpose. As with Mooncake's writer threads, transfers to one
    peer run one at a time: the oldest is TRANSFERRING (it can no longer be aborted), the
    ones behind it are WAITING (an abort cancels them).
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from concurrent.futures import Future

import torch

from xllm.kv_transfer.base import KvTransfer, KvTransferError, count_received, count_sent
from xllm.kv_transfer.layout import block_segments, layout_of
from xllm.protocol.kv_peer import KvPeer
from xllm.protocol.stats import KvTransferStats

_POOLS: dict[str, LoopbackTransport] = {}
"""Every open loopback pool of this process, by endpoint."""
_NAMES = itertools.count()


class LoopbackTransport:
    """One engine's KV pool, reachable by the other loopback pools of this process."""

    def __init__(self, kv: torch.Tensor, block_size: int, *, hold: bool = False):
        """`kv` is the engine's pool [L, 2, num_slots, Hkv, D] (`KVCache.tensor`)."""
        self.layout = layout_of(kv, block_size)
        self.kv = kv
        self.hold = hold
        self.endpoint = f"loopback-{next(_NAMES)}"
        self.stats = KvTransferStats()
        self._queues: dict[str, deque[tuple[Future[int], KvPeer, list[int], list[int]]]] = {}
        """Held transfers per peer endpoint, oldest first; the head is the one writing."""
        _POOLS[self.endpoint] = self

    @property
    def peer(self) -> KvPeer:
        return KvPeer(self.endpoint, self.kv.data_ptr(), self.layout)

    def submit(
        self, peer: KvPeer, local_block_ids: list[int], remote_block_ids: list[int]
    ) -> KvTransfer:
        future: Future[int] = Future()
        queue = self._queues.setdefault(peer.endpoint, deque())
        queue.append((future, peer, list(local_block_ids), list(remote_block_ids)))
        if len(queue) == 1:
            future.set_running_or_notify_cancel()  # the head of its queue: writing now
        if not self.hold:
            self.finish(peer.endpoint)
        return KvTransfer(future)

    def finish(self, endpoint: str | None = None, count: int | None = None) -> int:
        """Complete up to `count` held transfers (all when None), oldest first, to `endpoint`
        (every peer when None); returns how many ended (aborted ones do not count)."""
        ended = 0
        for name, queue in self._queues.items():
            while queue and (endpoint is None or name == endpoint):
                if count is not None and ended >= count:
                    return ended
                future, peer, local, remote = queue.popleft()
                if future.running():
                    self._write(future, peer, local, remote)
                    ended += 1
                self._start_next(queue)
        return ended

    def in_flight(self) -> int:
        """Held transfers not yet over (aborted ones excluded)."""
        return sum(1 for q in self._queues.values() for f, *_ in q if not f.done())

    def record_received(self, num_blocks: int) -> None:
        count_received(self.stats, num_blocks, num_blocks * self.layout.block_bytes)

    def close(self) -> None:
        _POOLS.pop(self.endpoint, None)
        for queue in self._queues.values():
            for future, *_ in queue:
                if not future.cancel():  # the one writing: it ends failed, never written
                    future.set_exception(KvTransferError("the transport was closed"))
        self._queues.clear()

    def _write(self, future: Future[int], peer: KvPeer, local: list[int], remote: list[int]):
        start = time.perf_counter()
        target = _POOLS.get(peer.endpoint)
        try:
            if target is None or target.kv.data_ptr() != peer.base_addr:
                raise KvTransferError(f"no KV pool at {peer.endpoint} (the peer is gone)")
            segments = block_segments(self.layout, peer.layout, local, remote)
            src, dst = _bytes(self.kv), _bytes(target.kv)
            for s, d, length in segments:
                dst[d : d + length] = src[s : s + length]
        except Exception as exc:
            future.set_exception(exc)
            return
        nbytes = sum(length for *_, length in segments)
        count_sent(self.stats, len(local), nbytes, len(segments), time.perf_counter() - start)
        future.set_result(nbytes)

    @staticmethod
    def _start_next(queue: deque) -> None:
        """Let the next transfer that was not aborted start writing."""
        while queue and not queue[0][0].set_running_or_notify_cancel():
            queue.popleft()  # cancelled while waiting: it never writes


def _bytes(kv: torch.Tensor) -> torch.Tensor:
    """The pool as one flat byte tensor (a view: writes land in the pool)."""
    return kv.view(-1).view(torch.uint8)
