"""PrefillSide: the prefill instance's half of prefill/decode disaggregation (report §3.2).

A `PrefillCmd` from decode instance D names D's reserved blocks and its `KvPeer`. The
request runs here prefill-only; its first token goes straight to the client's stream, its
KV is submitted to the transport (which moves it while the engine steps on), and D gets
exactly one `KvReady` per accepted PrefillCmd — D frees its blocks only on that answer.

A request's states here, and what ends each:

    PREFILLING ──first token──► SENDING ──write over──► ANSWERED ──step boundary──► freed
        │                          │                        ▲
        │ abort                    │ abort / D lost         │ (write over)
        ▼                          ▼                        │
    freed, answered "aborted"   CANCELLING ─────────────────┘  answered "aborted"

  abort, PREFILLING   no byte sent: the engine drops it, D is answered "aborted" at once.
  abort, SENDING      bytes may be in flight into D's blocks: the transfer is aborted if it
                      has not started (then it ends at once), else it runs to its end; either
                      way D is answered "aborted" once it is over (→ CANCELLING).
  abort, CANCELLING / ANSWERED   nothing more (the answer is, or is about to be, sent).
  D lost, PREFILLING  dropped without an answer (no one would read it).
  D lost, SENDING     as an abort: the write to a dead peer fails or is cancelled.
  first token ends the request (stop token, max_tokens 1): nothing to send; D is answered
                      `finished`, the engine already freed the blocks.
  write over          (on the event loop as soon as it ends, even mid-step: D should not wait
                      out a long prefill step) answer D — its first token, or the failure —
                      then, at the next step boundary, `release` frees our copy of the KV.

The transfer's end is reported from whatever thread ended it; the instance hands it to the
loop, calling `on_write_ended` at once and `release` between steps (the engine is not
thread-safe, so only `release` touches it). Either may run first.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass

from xllm.engine.engine import Engine, SequenceOutput
from xllm.instance.early_aborts import EarlyAborts
from xllm.instance.images import ImageInputs
from xllm.instance.lost_peers import LostPeers
from xllm.instance.wire import ABORTED, SendCmd, rejection
from xllm.kv_transfer.base import KvSender, KvTransfer, TransferState
from xllm.protocol import ErrorCode, ErrorInfo, KvReady, PrefillCmd

log = logging.getLogger(__name__)


class PrefillState(enum.Enum):
    PREFILLING = "prefilling"
    """In the engine until its first token; nothing sent yet."""
    SENDING = "sending"
    """Its KV is being written into the decode instance's blocks."""
    CANCELLING = "cancelling"
    """Aborted (or its decode instance lost) while SENDING: answered once the write is over."""
    ANSWERED = "answered"
    """KvReady sent; our copy of the KV is freed at the next step boundary."""


@dataclass
class PrefillRequest:
    cmd: PrefillCmd
    state: PrefillState = PrefillState.PREFILLING
    first: SequenceOutput | None = None
    """The step output with the first token (SENDING on)."""
    transfer: KvTransfer | None = None
    """The write of its KV into the decode instance's blocks (SENDING on)."""


class PrefillSide:
    def __init__(
        self,
        engine: Engine,
        transport: Callable[[], KvSender],
        send_cmd: SendCmd,
        write_ended: Callable[[str], None],
        lost_peers: LostPeers,
        early_aborts: EarlyAborts,
        images: ImageInputs | None = None,
    ):
        self.engine = engine
        self.transport = transport
        """The instance's transport, opened on first use."""
        self.send_cmd = send_cmd
        self.write_ended = write_ended
        """Thread-safe: tells the instance a request's write is over (request id)."""
        self.lost_peers = lost_peers
        self.early_aborts = early_aborts
        self.images = images or ImageInputs()
        """Decodes a request's images, or reads the embeddings an encoder made."""
        self.requests: dict[str, PrefillRequest] = {}
        """Every accepted PrefillCmd until its KV is freed here."""

    def owns(self, request_id: str) -> bool:
        return request_id in self.requests

    def in_state(self, state: PrefillState) -> list[str]:
        return [rid for rid, r in self.requests.items() if r.state is state]

    async def on_prefill(self, cmd: PrefillCmd) -> None:
        if self.lost_peers.lost(cmd.decode_instance_id, cmd.decode_started_at):
            return  # no one would read the KV, nor the answer
        if cmd.request_id in self.early_aborts:
            await self._answer(cmd, error=ABORTED)
            return
        layout = self.transport().layout
        if not cmd.peer.layout.compatible_with(layout):
            why = f"the decode instance's KV layout {cmd.peer.layout} does not match {layout}"
            await self._answer(cmd, error=ErrorInfo(code=ErrorCode.INTERNAL, message=why))
            return
        try:
            self.engine.add_request(
                cmd.request_id,
                list(cmd.request.prompt_token_ids),
                cmd.request.sampling,
                prefill_only=True,
                priority=cmd.request.priority,
                images=await self.images.inputs(cmd.request.images, self.engine.image_processor),
            )
        except ValueError as e:
            await self._answer(cmd, error=rejection(e))
            return
        self.requests[cmd.request_id] = PrefillRequest(cmd)

    async def on_step_output(self, out: SequenceOutput) -> None:
        """A prefill-only request produced its first token (the caller already streamed
        it): start writing its KV, or answer at once if that token ended it."""
        request = self.requests.get(out.request_id)
        if request is None or request.state is not PrefillState.PREFILLING:
            return
        cmd = request.cmd
        if not out.prefilled:  # finished at the first token: nothing to send
            del self.requests[out.request_id]
            await self._answer(cmd, finished=True)
            return
        skip = cmd.num_cached_tokens // cmd.peer.layout.block_size
        local = self.engine.prefilled_block_ids(cmd.request_id)[skip:]
        request.state, request.first = PrefillState.SENDING, out
        request.transfer = self.transport().submit(
            cmd.peer, local[: len(cmd.fill_block_ids)], cmd.fill_block_ids
        )
        request.transfer.add_done_callback(lambda _: self.write_ended(cmd.request_id))

    async def on_write_ended(self, request_id: str) -> None:
        """Answer the decode instance the moment the write ends — not at the next step
        boundary, which may be a long prefill step away. Touches no engine state."""
        request = self.requests.get(request_id)
        if request is not None and request.state is not PrefillState.ANSWERED:
            await self._answer_transfer(request)

    async def release(self, request_id: str) -> None:
        """Between steps, once the write is over: free our copy of the KV, and answer if
        `on_write_ended` has not yet run."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        assert request.transfer is not None and _over(request.transfer), request
        self.engine.release_prefilled(request_id)
        if request.state is not PrefillState.ANSWERED:
            await self._answer_transfer(request)

    async def abort(self, request_id: str) -> bool:
        """Abort a request of the prefill side (see the module docstring). False if it is
        not one; the id is then remembered as an early abort."""
        request = self.requests.get(request_id)
        if request is None:
            self.early_aborts.add(request_id)  # its command may still be on its way
            return False
        if request.state is PrefillState.PREFILLING:
            self.engine.abort_request(request_id)
            del self.requests[request_id]
            await self._answer(request.cmd, error=ABORTED)
        elif request.state is PrefillState.SENDING:
            self._cancel(request)
        return True

    async def on_instance_lost(self, instance_id: str, started_at: float = 0.0) -> None:
        """The run `started_at` of peer `instance_id` is gone: stop what is meant for it,
        and remember, for the commands naming it still on their way."""
        self.lost_peers.note(instance_id, started_at)
        for request_id, request in list(self.requests.items()):
            cmd = request.cmd
            if not self.lost_peers.lost(cmd.decode_instance_id, cmd.decode_started_at):
                continue
            if request.state is PrefillState.PREFILLING:
                self.engine.abort_request(request_id)
                del self.requests[request_id]
            elif request.state is PrefillState.SENDING:
                self._cancel(request)

    def _cancel(self, request: PrefillRequest) -> None:
        """SENDING → CANCELLING; answered "aborted" when the write is over, which is at
        once (through `write_ended`) if the transfer had not started."""
        assert request.transfer is not None
        request.state = PrefillState.CANCELLING
        request.transfer.abort()

    async def _answer_transfer(self, request: PrefillRequest) -> None:
        cancelled = request.state is PrefillState.CANCELLING
        request.state = PrefillState.ANSWERED  # before any await: the other caller must see it
        cmd, transfer, first = request.cmd, request.transfer, request.first
        assert transfer is not None and first is not None
        if cancelled:
            await self._answer(cmd, error=ABORTED)
        elif transfer.error is not None:
            log.error("%s: KV transfer failed: %s", cmd.request_id, transfer.error)
            why = f"the KV transfer to the decode instance failed: {transfer.error}"
            await self._answer(cmd, error=ErrorInfo(code=ErrorCode.INTERNAL, message=why))
        else:
            await self._answer(
                cmd,
                first_token_id=first.token_ids[0],
                first_logprob=first.logprobs[0] if first.logprobs else None,
                num_blocks=len(cmd.fill_block_ids),
            )

    async def _answer(self, cmd: PrefillCmd, **fields) -> None:
        await self.send_cmd(cmd.decode_instance_id, KvReady(request_id=cmd.request_id, **fields))


def _over(transfer: KvTransfer) -> bool:
    return transfer.poll() in (TransferState.DONE, TransferState.FAILED)
