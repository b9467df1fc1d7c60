"""The KV-transfer seam: what an instance needs from a transport, whatever moves the bytes.

A transport is one engine's KV pool made reachable by peers. It plays both parts, because
an instance's role can flip between prefill and decode without a restart:

  * receiver (`KvReceiver`): hands out `peer`, the `KvPeer` senders write into, and counts
    what it was told arrived (`record_received`; the receiver cannot observe the writes);
  * sender (`KvSender`): `submit` copies local blocks into a peer's blocks and returns a
    `KvTransfer` at once; the bytes move elsewhere (a writer thread, the network) while the
    engine keeps stepping.

A transfer's life (`TransferState`):

    WAITING ──► TRANSFERRING ──► DONE
       │              └────────► FAILED   (the peer is gone, the transport refused)
       └── abort() ────────────► FAILED   (cancelled: no byte was written)

`abort()` only stops a transfer that has not started. Bytes in flight cannot be recalled
(a one-sided write lands when it lands), so a transfer that is TRANSFERRING runs to DONE
or FAILED; until it gets there the sender must hold its source blocks, and the receiver
must not reuse the destination blocks — whoever aborts waits for the end (Dynamo's
deferred abort). Every transfer reaches DONE or FAILED exactly once and then calls its
done callbacks, from whichever thread finished it.

Implementations: `mooncake.MooncakeTransport` (the Mooncake Transfer Engine over TCP, between
processes) and `loopback.LoopbackTransport` (a byte copy between two pools of one process,
for tests). `xllm.kv_transfer.open_transport` picks one by name (`--kv-transfer-backend`).
"""

from __future__ import annotations

import copy
import enum
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Protocol

from xllm.protocol.kv_peer import KvLayout, KvPeer
from xllm.protocol.stats import KvTransferStats


class KvTransferError(RuntimeError):
    """A transport refused or failed an operation."""


class TransferState(enum.Enum):
    WAITING = "waiting"
    """Submitted, not started: queued behind earlier transfers to the same peer."""
    TRANSFERRING = "transferring"
    """Bytes are moving; it can no longer be stopped."""
    DONE = "done"
    """Every byte is in the peer's blocks."""
    FAILED = "failed"
    """It will never complete (`KvTransfer.error` says why); aborted ones end here too."""


class KvTransfer:
    """One submitted block copy, backed by the future of the code that moves its bytes.

    The future's result is the number of bytes written; it is pending while the transfer
    waits, running while the bytes move (`set_running_or_notify_cancel`), and ends done,
    failed (an exception) or cancelled (`abort` before it started).
    """

    def __init__(self, future: Future[int]):
        self._future = future

    def poll(self) -> TransferState:
        f = self._future
        if not f.done():
            return TransferState.TRANSFERRING if f.running() else TransferState.WAITING
        return TransferState.DONE if self.error is None else TransferState.FAILED

    def abort(self) -> bool:
        """Cancel the transfer if it has not started (it ends FAILED, nothing written);
        False if it is already moving bytes or over."""
        return self._future.cancel()

    @property
    def error(self) -> str | None:
        """Why it failed; None while it runs and once it is DONE."""
        f = self._future
        if not f.done():
            return None
        if f.cancelled():
            return "aborted before it started"
        exc = f.exception()
        return None if exc is None else str(exc)

    @property
    def nbytes(self) -> int:
        """Bytes written (0 unless DONE)."""
        return self._future.result() if self.poll() is TransferState.DONE else 0

    def wait(self, timeout: float | None = None) -> int:
        """Block until the transfer is over; the bytes written, or KvTransferError."""
        try:
            return self._future.result(timeout)
        except (KvTransferError, TimeoutError):
            raise
        except Exception as exc:  # cancelled, or an error of the code that moved the bytes
            raise KvTransferError(self.error or repr(exc)) from exc

    def add_done_callback(self, fn: Callable[[KvTransfer], None]) -> None:
        """Call `fn(self)` once the transfer is DONE or FAILED — at once if it already is —
        on the thread that ended it."""
        self._future.add_done_callback(lambda _: fn(self))


_STATS_LOCK = threading.Lock()
"""Guards every transport's `KvTransferStats`: writer threads update them, one update per
transfer, and the heartbeat copies them."""


def count_sent(
    stats: KvTransferStats, num_blocks: int, nbytes: int, num_writes: int, seconds: float
) -> None:
    """Count one finished transfer of `num_blocks` blocks in `num_writes` writes."""
    with _STATS_LOCK:
        stats.blocks_sent += num_blocks
        stats.bytes_sent += nbytes
        stats.writes += num_writes
        stats.transfers += 1
        stats.seconds_sending += seconds


def count_received(stats: KvTransferStats, num_blocks: int, nbytes: int) -> None:
    """Count blocks a peer says it wrote into this pool."""
    with _STATS_LOCK:
        stats.blocks_received += num_blocks
        stats.bytes_received += nbytes


def stats_snapshot(stats: KvTransferStats) -> KvTransferStats:
    """A copy of `stats` no writer thread is halfway through (for a heartbeat)."""
    with _STATS_LOCK:
        return copy.copy(stats)


class KvReceiver(Protocol):
    """The pool as a write target."""

    @property
    def peer(self) -> KvPeer:
        """This pool as senders address it; goes out in `PrefillCmd.peer`."""
        ...

    def record_received(self, num_blocks: int) -> None:
        """Count blocks a peer says it wrote into this pool (on its `KvReady`)."""
        ...


class KvSender(Protocol):
    """The pool as a source of blocks."""

    layout: KvLayout
    """This pool's layout; a peer's must be `compatible_with` it."""

    def submit(
        self, peer: KvPeer, local_block_ids: list[int], remote_block_ids: list[int]
    ) -> KvTransfer:
        """Start copying local blocks into the peer's blocks, pairwise; returns at once.

        Transfers to one peer run one at a time, in submission order. The caller must keep
        the local blocks unchanged (held) until the transfer is DONE or FAILED.
        """
        ...


class KvTransport(KvSender, KvReceiver, Protocol):
    """Both parts, plus what an instance reports and how it lets go."""

    endpoint: str
    """Where peers reach this transport (goes out in heartbeats)."""
    stats: KvTransferStats
    """What it moved so far, counted with `count_sent` / `count_received`."""

    def close(self) -> None:
        """Stop the transport; transfers still waiting are dropped, in-flight ones may fail."""
        ...
