"""The instance's conversions to the wire: engine outputs → `TokenDelta`s, and the deltas
and errors it sends when a request cannot run.

Error codes come from the errors' types (`RequestRejected` carries one), never from their
text: `rejection` is the one place a refused request becomes an `ErrorInfo`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from xllm.engine.engine import SequenceOutput
from xllm.engine.sequence import FinishReason
from xllm.protocol import DraftCounts, ErrorCode, ErrorInfo, ProtocolError, TokenDelta

SendCmd = Callable[[str, object], Awaitable[None]]
"""Publish a message on an instance's command subject: (instance_id, message)."""
SendDelta = Callable[[TokenDelta], Awaitable[None]]
"""Publish a delta on its request's output subject."""

ABORTED = ErrorInfo(code=ErrorCode.INVALID_REQUEST, message="the request was aborted")
"""What a prefill instance answers (`KvReady.error`) for a request aborted before its KV
was delivered."""


def to_wire(d: SequenceOutput) -> TokenDelta:
    finish = d.finish_reason.value if isinstance(d.finish_reason, FinishReason) else None
    return TokenDelta(
        request_id=d.request_id,
        index=d.index,
        token_ids=d.token_ids,
        logprobs=d.logprobs,
        finish_reason=finish,  # type: ignore[arg-type]
        num_prompt_tokens=d.num_prompt_tokens,
        num_cached_tokens=d.num_cached_tokens,
        num_output_tokens=d.num_output_tokens,
        drafts=DraftCounts(d.num_draft_tokens, d.num_accepted_draft_tokens)
        if d.num_draft_tokens
        else None,
        cumulative_logprob=d.cumulative_logprob,
    )


def rejection(error: ValueError) -> ErrorInfo:
    """The wire form of a request the engine refused: its own code if it carries one
    (`RequestRejected`), INVALID_REQUEST for a plain ValueError."""
    if isinstance(error, ProtocolError):
        return error.info
    return ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=str(error))


def error_delta(request_id: str, error: ErrorInfo) -> TokenDelta:
    return TokenDelta(request_id=request_id, finish_reason="error", error=error)


def abort_delta(request_id: str, index: int = 0) -> TokenDelta:
    return TokenDelta(request_id=request_id, index=index, finish_reason="abort")
