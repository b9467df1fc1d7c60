"""PdRequests: an instance's side of prefill/decode disaggregation (report §3.2).

The flow (messages in `xllm.protocol.instance`):

    decode instance D                                prefill instance P
    DecodeCmd → reserve the prompt's blocks
      (no room: wait, retried after every step)
    ──PrefillCmd (D's blocks, Mooncake peer)──►      prefill-only request; its first token
                                                     goes straight to the client's stream;
                                                     its KV is written into D's blocks on
                                                     the transport's writer thread while
                                                     the engine steps on
    ◄──────────────────────KvReady──────────────     then P frees its copy
    decode from the first token on

Block lifetime is the point. Every PrefillCmd P accepts is answered by exactly one KvReady
(delivered, finished at the first token, failed or aborted), and D frees a reserved block
only on that answer — or after `transfer_timeout`, if P died. So an abort racing a write
never frees a block that P may still be writing into: D answers the client at once
("abort") but keeps the blocks until P confirms it has stopped.

Everything that touches the engine runs on the instance's event loop between engine steps
(the engine is not thread-safe); the Mooncake writes run on the transport's thread. A
finished write is answered at once (`on_write_finished`, on the loop, while a step may be
running: the decode instance should not wait out a long prefill step for its KvReady), and
queued as a `TransferDone` so the prefill-side blocks are freed at the next step boundary.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from xllm.engine.engine import Engine, SequenceOutput
from xllm.kv_transfer.layout import KvLayout
from xllm.kv_transfer.mooncake import KvPeer, KvTransport
from xllm.protocol import (
    DecodeCmd,
    ErrorCode,
    ErrorInfo,
    KvPeerInfo,
    KvReady,
    PrefillCmd,
    TokenDelta,
)

log = logging.getLogger(__name__)

LOST_PEER_MEMORY = 30.0
"""Seconds after a peer is announced lost during which commands naming it are dropped."""

SendCmd = Callable[[str, object], Awaitable[None]]
"""Publish a message on an instance's command subject: (instance_id, message)."""
SendDelta = Callable[[TokenDelta], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class TransferDone:
    """A Mooncake write finished (on the writer thread); handled on the loop."""

    request_id: str
    error: str | None = None


@dataclass
class _Reserved:
    """Decode side: a request whose blocks wait for a prefill instance's KV."""

    cmd: DecodeCmd
    num_fill_blocks: int
    since: float
    cancelled: bool = False
    """Aborted: the client was told; the blocks wait for P's answer before being freed."""


@dataclass
class _Prefilling:
    """Prefill side: an accepted PrefillCmd, until its KvReady is sent."""

    cmd: PrefillCmd
    first: SequenceOutput | None = None
    writing: bool = False
    aborted: bool = False
    answered: bool = False
    """KvReady sent (by whichever of on_write_finished / on_transfer_done ran first)."""


class PdRequests:
    def __init__(
        self,
        instance_id: str,
        engine: Engine,
        transport: KvTransport,
        send_cmd: SendCmd,
        send_delta: SendDelta,
        notify_transfer_done: Callable[[TransferDone], None],
        transfer_timeout: float,
        started_at: float = 0.0,
    ):
        self.instance_id = instance_id
        self.started_at = started_at
        """This run's `Heartbeat.started_at`, sent with our PrefillCmds."""
        self.engine = engine
        self.transport = transport
        self.send_cmd = send_cmd
        self.send_delta = send_delta
        self.notify_transfer_done = notify_transfer_done
        """Thread-safe: hands a `TransferDone` to the loop (on_write_finished at once,
        on_transfer_done between steps)."""
        self.transfer_timeout = transfer_timeout
        self.awaiting_room: deque[DecodeCmd] = deque()
        self.reserved: dict[str, _Reserved] = {}
        self.prefilling: dict[str, _Prefilling] = {}
        self.recently_aborted: deque[str] = deque(maxlen=4096)
        """Aborts for requests unknown here: the gateway's abort can overtake the decode
        instance's PrefillCmd, which must then be answered at once, not prefilled."""
        self.lost_at: dict[str, tuple[float, float]] = {}
        """Peers announced lost: when, and which run of them (`started_at`, 0 = unknown).
        Commands naming that run that were already on their way (or queued here for room)
        must not start a transfer no one will answer; a later run is a new peer."""

    def owns(self, request_id: str) -> bool:
        return (
            request_id in self.reserved
            or request_id in self.prefilling
            or any(c.request_id == request_id for c in self.awaiting_room)
        )

    # -- decode side ----------------------------------------------------------------------

    async def on_decode(self, cmd: DecodeCmd) -> None:
        self.awaiting_room.append(cmd)
        await self.reserve_waiting()

    async def reserve_waiting(self) -> None:
        """Reserve blocks for queued DecodeCmds, in order, while the pool has room."""
        while self.awaiting_room:
            cmd = self.awaiting_room[0]
            if self._gone(cmd):
                self.awaiting_room.popleft()  # the gateway resumes or has dropped it
                continue
            try:
                reservation = self.engine.reserve_remote_prefill(
                    cmd.request_id,
                    list(cmd.request.prompt_token_ids),
                    cmd.request.sampling,
                    priority=cmd.request.priority,
                )
            except ValueError as e:
                self.awaiting_room.popleft()
                await self._fail(cmd.request_id, ErrorCode.INVALID_REQUEST, str(e))
                continue
            if reservation is None:
                return  # no room yet: blocks free up as running requests finish
            self.awaiting_room.popleft()
            fill = reservation.fill_block_ids
            self.reserved[cmd.request_id] = _Reserved(cmd, len(fill), time.monotonic())
            prefill = PrefillCmd(
                request_id=cmd.request_id,
                request=cmd.request,
                decode_instance_id=self.instance_id,
                decode_started_at=self.started_at,
                peer=peer_info(self.transport.peer),
                num_cached_tokens=reservation.num_cached_tokens,
                fill_block_ids=list(fill),
            )
            await self.send_cmd(cmd.prefill_instance_id, prefill)

    async def on_kv_ready(self, msg: KvReady) -> None:
        entry = self.reserved.pop(msg.request_id, None)
        if entry is None:
            log.warning("KvReady for %s, which holds no reservation here", msg.request_id)
            return
        if entry.cancelled or msg.finished or msg.error is not None:
            self.engine.abort_request(msg.request_id)  # frees the reserved blocks
            if msg.error is not None and not entry.cancelled:
                await self.send_delta(error_delta(msg.request_id, msg.error))
            return
        self.transport.record_received(msg.num_blocks)
        reason = self.engine.commit_remote_prefill(
            msg.request_id, msg.first_token_id, msg.first_logprob
        )
        if reason is not None:  # the first token ended it; P streamed the token itself
            await self.send_delta(
                TokenDelta(request_id=msg.request_id, finish_reason=reason.value)  # type: ignore[arg-type]
            )

    async def expire_reservations(self, now: float) -> None:
        """Free reservations whose prefill instance never answered (it died)."""
        late = [r for r, e in self.reserved.items() if now - e.since > self.transfer_timeout]
        for request_id in late:
            entry = self.reserved.pop(request_id)
            self.engine.abort_request(request_id)
            if not entry.cancelled:
                message = f"the prefill instance {entry.cmd.prefill_instance_id} did not answer"
                await self._fail(request_id, ErrorCode.INSTANCE_FAILED, message)

    # -- prefill side ---------------------------------------------------------------------

    async def on_prefill(self, cmd: PrefillCmd) -> None:
        if self.peer_lost(cmd.decode_instance_id, cmd.decode_started_at):
            return  # no one would read the KV, nor the answer
        if cmd.request_id in self.recently_aborted:
            await self._answer(cmd, error=aborted_error())
            return
        layout = peer_of(cmd.peer).layout
        if not layout.compatible_with(self.transport.layout):
            why = f"the decode instance's KV layout {layout} does not match {self.transport.layout}"
            await self._answer(cmd, error=ErrorInfo(code=ErrorCode.INTERNAL, message=why))
            return
        try:
            self.engine.add_request(
                cmd.request_id,
                list(cmd.request.prompt_token_ids),
                cmd.request.sampling,
                prefill_only=True,
                priority=cmd.request.priority,
            )
        except ValueError as e:
            await self._answer(cmd, error=ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=str(e)))
            return
        self.prefilling[cmd.request_id] = _Prefilling(cmd)

    async def on_step_output(self, out: SequenceOutput) -> None:
        """A prefill-only request produced its first token (the caller already streamed
        it): start writing its KV, or answer at once if that token ended it."""
        entry = self.prefilling.get(out.request_id)
        if entry is None:
            return
        if not out.prefilled:  # finished at the first token: nothing to send
            del self.prefilling[out.request_id]
            await self._answer(entry.cmd, finished=True)
            return
        entry.first, entry.writing = out, True
        cmd = entry.cmd
        skip = cmd.num_cached_tokens // cmd.peer.block_size
        local = self.engine.prefilled_block_ids(cmd.request_id)[skip:]
        future = self.transport.submit_blocks(
            peer_of(cmd.peer), local[: len(cmd.fill_block_ids)], cmd.fill_block_ids
        )

        def done(f) -> None:  # on the writer thread: hand over to the loop
            error = None if f.exception() is None else str(f.exception())
            self.notify_transfer_done(TransferDone(cmd.request_id, error))

        future.add_done_callback(done)

    async def on_write_finished(self, done: TransferDone) -> None:
        """Answer the decode instance the moment the write ends — not at the next step
        boundary, which may be a long prefill step away. Touches no engine state (the
        engine may be mid-step); `on_transfer_done` frees the blocks between steps."""
        entry = self.prefilling.get(done.request_id)
        if entry is not None and not entry.answered:
            await self._answer_transfer(entry, done)

    async def on_transfer_done(self, done: TransferDone) -> None:
        """Between steps: free our copy of the KV, and answer if `on_write_finished` has
        not yet run (the two are scheduled separately; either may come first)."""
        entry = self.prefilling.pop(done.request_id, None)
        if entry is None:
            return
        self.engine.release_prefilled(done.request_id)
        if not entry.answered:
            await self._answer_transfer(entry, done)

    async def _answer_transfer(self, entry: _Prefilling, done: TransferDone) -> None:
        entry.answered = True  # before any await: the other caller must see it
        if entry.aborted:
            await self._answer(entry.cmd, error=aborted_error())
        elif done.error is not None:
            log.error("%s: KV transfer failed: %s", done.request_id, done.error)
            message = f"the KV transfer to the decode instance failed: {done.error}"
            await self._answer(entry.cmd, error=ErrorInfo(code=ErrorCode.INTERNAL, message=message))
        else:
            first = entry.first
            await self._answer(
                entry.cmd,
                first_token_id=first.token_ids[0],
                first_logprob=first.logprobs[0] if first.logprobs else None,
                num_blocks=len(entry.cmd.fill_block_ids),
            )

    # -- both -----------------------------------------------------------------------------

    async def on_instance_lost(self, instance_id: str, started_at: float = 0.0) -> None:
        """A peer died (or restarted: `started_at` names the run that is gone): nothing it
        owed us will come, nothing we owe it can be delivered. Free what waits on it at once
        (the gateway resumes those requests elsewhere)."""
        self.lost_at[instance_id] = (time.monotonic(), started_at)
        for cmd in [c for c in self.awaiting_room if self._gone(c)]:
            self.awaiting_room.remove(cmd)
        for request_id, entry in list(self.reserved.items()):
            cmd = entry.cmd
            if self.peer_lost(cmd.prefill_instance_id, cmd.prefill_started_at):
                del self.reserved[request_id]
                self.engine.abort_request(request_id)
        for request_id, entry in list(self.prefilling.items()):
            to_lost = self.peer_lost(entry.cmd.decode_instance_id, entry.cmd.decode_started_at)
            if to_lost and not entry.writing:
                del self.prefilling[request_id]
                self.engine.abort_request(request_id)
            elif to_lost:
                entry.aborted = True  # released when the (failing) write returns

    async def abort(self, request_id: str) -> bool:
        """Handle an abort for a request in the PD flow; False if it is not one."""
        for cmd in list(self.awaiting_room):
            if cmd.request_id == request_id:
                self.awaiting_room.remove(cmd)
                await self.send_delta(TokenDelta(request_id=request_id, finish_reason="abort"))
                return True
        if (reserved := self.reserved.get(request_id)) is not None:
            if not reserved.cancelled:  # blocks stay held until P answers (module doc)
                reserved.cancelled = True
                await self.send_delta(TokenDelta(request_id=request_id, finish_reason="abort"))
            return True
        if (entry := self.prefilling.get(request_id)) is not None:
            if entry.writing:
                entry.aborted = True  # answered when the write ends
            else:
                self.engine.abort_request(request_id)
                del self.prefilling[request_id]
                await self._answer(entry.cmd, error=aborted_error())
            return True
        self.recently_aborted.append(request_id)
        return False

    def peer_lost(self, instance_id: str, started_at: float = 0.0) -> bool:
        """The run `started_at` of `instance_id` was announced lost within LOST_PEER_MEMORY.
        A different run (restarted under the same id) is a new peer; an unknown run (0 on
        either side) counts as the lost one."""
        entry = self.lost_at.get(instance_id)
        if entry is None:
            return False
        lost_at, lost_run = entry
        if started_at and lost_run and started_at != lost_run:
            return False
        return time.monotonic() - lost_at < LOST_PEER_MEMORY

    def _gone(self, cmd: DecodeCmd) -> bool:
        """A queued DecodeCmd that must not reserve: aborted before it arrived, or its
        prefill instance was lost (the gateway resumes such requests elsewhere)."""
        return cmd.request_id in self.recently_aborted or self.peer_lost(
            cmd.prefill_instance_id, cmd.prefill_started_at
        )

    async def _answer(self, cmd: PrefillCmd, **fields) -> None:
        await self.send_cmd(cmd.decode_instance_id, KvReady(request_id=cmd.request_id, **fields))

    async def _fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        await self.send_delta(error_delta(request_id, ErrorInfo(code=code, message=message)))


def peer_info(peer: KvPeer) -> KvPeerInfo:
    layout = peer.layout
    return KvPeerInfo(
        endpoint=peer.endpoint,
        base_addr=peer.base_addr,
        num_layers=layout.num_layers,
        num_blocks=layout.num_blocks,
        block_size=layout.block_size,
        token_bytes=layout.token_bytes,
    )


def peer_of(info: KvPeerInfo) -> KvPeer:
    layout = KvLayout(info.num_layers, info.num_blocks, info.block_size, info.token_bytes)
    return KvPeer(info.endpoint, info.base_addr, layout)


def aborted_error() -> ErrorInfo:
    return ErrorInfo(code=ErrorCode.INVALID_REQUEST, message="the request was aborted")


def error_delta(request_id: str, error: ErrorInfo) -> TokenDelta:
    return TokenDelta(request_id=request_id, finish_reason="error", error=error)
