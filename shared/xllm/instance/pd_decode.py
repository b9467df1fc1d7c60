"""DecodeSide: the decode instance's half of prefill/decode disaggregation (report §3.2).

    decode instance D (here)                          prefill instance P
    DecodeCmd → reserve the prompt's blocks
      (no room: wait, retried after every step)
    ──PrefillCmd (D's blocks, D's KvPeer)──────►      prefills, streams the first token,
                                                      writes the KV into D's blocks
    ◄──────────────────────KvReady──────────────
    decode from the first token on

Block lifetime is the point. P answers every PrefillCmd it accepts with exactly one KvReady
(delivered, finished at the first token, failed or aborted), and D frees a reserved block
only on that answer — or after `transfer_timeout`, if P died without a word, or at once when
P is announced lost. So an abort racing a write never frees a block P may still write into.

A request's states here, and what ends each:

    AWAITING_ROOM ──(blocks reserved, PrefillCmd sent)──► RESERVED ──KvReady──► the engine decodes
          │                                                  │
          │                                         abort    ▼
          │                                              CANCELLED ──KvReady / timeout──► freed
          └─ abort / P lost / aborted before it came ─► dropped (no block was held)

  abort, AWAITING_ROOM  nothing is held and nothing was asked: forgotten; the client gets "abort".
  abort, RESERVED       P may be writing: the client gets "abort" now, the blocks stay held
                        until P answers (→ CANCELLED).
  abort, CANCELLED      already done: nothing more.
  KvReady, RESERVED     delivered: commit, decode; with `error` or `finished` instead: free
                        the blocks (the client gets the error; P already sent a finish).
  KvReady, CANCELLED    free the blocks, whatever it says.
  KvReady, otherwise    late or duplicate (this request holds nothing here): logged, dropped.
  timeout               RESERVED or CANCELLED past `transfer_timeout`: free; a RESERVED one's
                        client gets INSTANCE_FAILED.
  P lost                everything waiting on that run of P is dropped and its blocks freed
                        at once (nothing will write); no delta: the gateway resumes it.

Everything here runs on the instance's event loop between engine steps.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from xllm.engine.engine import Engine
from xllm.engine.multimodal import ImageInput
from xllm.instance.early_aborts import EarlyAborts
from xllm.instance.images import ImageInputs
from xllm.instance.lost_peers import LostPeers
from xllm.instance.wire import (
    SendCmd,
    SendDelta,
    abort_delta,
    error_delta,
    rejection,
)
from xllm.kv_transfer.base import KvReceiver
from xllm.protocol import DecodeCmd, ErrorCode, ErrorInfo, KvReady, PrefillCmd, TokenDelta

log = logging.getLogger(__name__)


class DecodeState(enum.Enum):
    AWAITING_ROOM = "awaiting_room"
    """Queued until the pool has room for the prompt; no block held, no PrefillCmd sent."""
    RESERVED = "reserved"
    """Blocks held, PrefillCmd sent; waiting for the prefill instance's KvReady."""
    CANCELLED = "cancelled"
    """Aborted while RESERVED: the client was told; the blocks wait for KvReady."""


@dataclass
class DecodeRequest:
    cmd: DecodeCmd
    state: DecodeState = DecodeState.AWAITING_ROOM
    reserved_at: float = 0.0
    """time.monotonic() when its blocks were reserved: the transfer timeout runs from here."""
    images: list[ImageInput] | None = None
    """Its images as the engine takes them, made once on arrival (decoded, or the
    embeddings an encoder made, read through Mooncake: a recompute here needs them)."""


class DecodeSide:
    def __init__(
        self,
        instance_id: str,
        started_at: float,
        engine: Engine,
        transport: Callable[[], KvReceiver],
        send_cmd: SendCmd,
        send_delta: SendDelta,
        lost_peers: LostPeers,
        early_aborts: EarlyAborts,
        transfer_timeout: float,
        images: ImageInputs | None = None,
    ):
        self.instance_id = instance_id
        self.started_at = started_at
        """This run's `Heartbeat.started_at`, sent with our PrefillCmds."""
        self.engine = engine
        self.transport = transport
        """The instance's transport, opened on first use."""
        self.send_cmd = send_cmd
        self.send_delta = send_delta
        self.lost_peers = lost_peers
        self.early_aborts = early_aborts
        self.transfer_timeout = transfer_timeout
        self.images = images or ImageInputs()
        self.requests: dict[str, DecodeRequest] = {}
        """Every request of the decode side until the engine takes it over or it is freed;
        in arrival order, which is the order requests awaiting room get it."""

    def owns(self, request_id: str) -> bool:
        return request_id in self.requests

    def in_state(self, state: DecodeState) -> list[str]:
        """Request ids in `state`, in arrival order."""
        return [rid for rid, r in self.requests.items() if r.state is state]

    def waits_on_peers(self) -> bool:
        """Something here waits for room or for another instance (the loop must wake up
        now and then, to retry reservations and to expire abandoned ones)."""
        return bool(self.requests)

    async def on_decode(self, cmd: DecodeCmd) -> None:
        if cmd.request_id in self.requests:  # what the engine would say for a second one
            why = f"request id {cmd.request_id!r} is already in use"
            await self.send_delta(error_delta(cmd.request_id, invalid(why)))
            return
        try:
            images = await self.images.inputs(cmd.request.images, self.engine.image_processor)
        except ValueError as e:
            await self.send_delta(error_delta(cmd.request_id, rejection(e)))
            return
        self.requests[cmd.request_id] = DecodeRequest(cmd, images=images)
        await self.reserve_waiting()

    async def reserve_waiting(self) -> None:
        """Reserve blocks for requests awaiting room, in arrival order, while there is room."""
        for request_id in self.in_state(DecodeState.AWAITING_ROOM):
            request = self.requests[request_id]
            if self._gone(request.cmd):
                del self.requests[request_id]  # the gateway resumes it or has dropped it
                continue
            if not await self._reserve(request):
                return  # no room yet: blocks free up as running requests finish

    async def on_kv_ready(self, msg: KvReady) -> None:
        request = self.requests.get(msg.request_id)
        if request is None or request.state is DecodeState.AWAITING_ROOM:
            log.warning("KvReady for %s, which holds no reservation here", msg.request_id)
            return
        del self.requests[msg.request_id]
        if request.state is DecodeState.CANCELLED or msg.finished or msg.error is not None:
            self.engine.abort_request(msg.request_id)  # frees the reserved blocks
            if msg.error is not None and request.state is DecodeState.RESERVED:
                await self.send_delta(error_delta(msg.request_id, msg.error))
            return
        self.transport().record_received(msg.num_blocks)
        first_logprob = msg.first_logprob
        reason = self.engine.commit_remote_prefill(
            msg.request_id, msg.first_token_id, first_logprob
        )
        if reason is not None:  # the first token ended it; P streamed the token itself
            await self.send_delta(
                TokenDelta(request_id=msg.request_id, finish_reason=reason.value)  # type: ignore[arg-type]
            )

    async def expire(self, now: float) -> None:
        """Free reservations whose prefill instance never answered (it died)."""
        for request_id, request in list(self.requests.items()):
            if request.state is DecodeState.AWAITING_ROOM:
                continue
            if now - request.reserved_at <= self.transfer_timeout:
                continue
            del self.requests[request_id]
            self.engine.abort_request(request_id)
            if request.state is DecodeState.RESERVED:
                why = f"the prefill instance {request.cmd.prefill_instance_id} did not answer"
                error = ErrorInfo(code=ErrorCode.INSTANCE_FAILED, message=why)
                await self.send_delta(error_delta(request_id, error))

    async def abort(self, request_id: str) -> bool:
        """Abort a request of the decode side (see the module docstring). False if it is
        not one; the id is then remembered as an early abort."""
        request = self.requests.get(request_id)
        if request is None:
            self.early_aborts.add(request_id)  # its command may still be on its way
            return False
        if request.state is DecodeState.AWAITING_ROOM:
            del self.requests[request_id]
            await self.send_delta(abort_delta(request_id))
        elif request.state is DecodeState.RESERVED:
            request.state = DecodeState.CANCELLED  # freed when P answers
            await self.send_delta(abort_delta(request_id))
        return True

    async def on_instance_lost(self, instance_id: str, started_at: float = 0.0) -> None:
        """The run `started_at` of peer `instance_id` is gone: drop what waits on it, and
        remember, for the commands naming it still on their way."""
        self.lost_peers.note(instance_id, started_at)
        for request_id, request in list(self.requests.items()):
            cmd = request.cmd
            if not self.lost_peers.lost(cmd.prefill_instance_id, cmd.prefill_started_at):
                continue
            del self.requests[request_id]
            if request.state is not DecodeState.AWAITING_ROOM:
                self.engine.abort_request(request_id)  # nothing will write into them now

    async def _reserve(self, request: DecodeRequest) -> bool:
        """Reserve the blocks and ask the prefill instance; False if the pool is short."""
        cmd = request.cmd
        try:
            reservation = self.engine.reserve_remote_prefill(
                cmd.request_id,
                list(cmd.request.prompt_token_ids),
                cmd.request.sampling,
                priority=cmd.request.priority,
                images=request.images,
            )
        except ValueError as e:
            del self.requests[cmd.request_id]
            await self.send_delta(error_delta(cmd.request_id, rejection(e)))
            return True
        if reservation is None:
            return False
        request.state, request.reserved_at = DecodeState.RESERVED, time.monotonic()
        prefill = PrefillCmd(
            request_id=cmd.request_id,
            request=cmd.request,
            decode_instance_id=self.instance_id,
            decode_started_at=self.started_at,
            peer=self.transport().peer,
            num_cached_tokens=reservation.num_cached_tokens,
            fill_block_ids=list(reservation.fill_block_ids),
        )
        await self.send_cmd(cmd.prefill_instance_id, prefill)
        return True

    def _gone(self, cmd: DecodeCmd) -> bool:
        """A request that must not reserve: aborted before its DecodeCmd came, or its
        prefill instance was lost (the gateway resumes such requests elsewhere)."""
        lost = self.lost_peers.lost(cmd.prefill_instance_id, cmd.prefill_started_at)
        return lost or cmd.request_id in self.early_aborts


def invalid(message: str) -> ErrorInfo:
    return ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=message)
