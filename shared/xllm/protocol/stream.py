"""The token stream: instance → gateway on `request_output(request_id)`.

One `TokenDelta` per completion per engine step (or per chunk of steps), carrying only the
tokens that are new since the previous delta of the same (request_id, index) — never the
whole output so far. Detokenization, stop strings and SSE framing are the gateway's job.

Stream contract, per completion index:
  * zero or more deltas with finish_reason None, then exactly one final delta with a
    finish_reason (its token_ids may be empty, e.g. on abort);
  * finish_reason "error" comes with `error` set (e.g. the instance rejected the request or
    died mid-way); every other delta has error None;
  * the `num_*` usage counts are cumulative, so the final delta carries the request's usage.
The request is done when every one of its `n` completions has sent its final delta.
A beam search request streams nothing until the search ends, then sends its `n` best beams,
each whole in one final delta with `cumulative_logprob` set.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from xllm.protocol.codec import message
from xllm.protocol.errors import ErrorInfo
from xllm.protocol.types import Logprob

FinishReason = Literal["stop", "length", "abort", "error"]
"""Why a completion ended: EOS/stop token, max_tokens/context length, abort, failure."""


class DraftCounts(NamedTuple):
    """Speculative decoding's tally for one completion, cumulative; a 2-element array."""

    num_draft_tokens: int
    """Draft tokens verified so far."""
    num_accepted_tokens: int
    """Of those, the ones the target model kept."""


# v3: `cumulative_logprob` (beam search's final deltas).
@message("token_delta", version=3)
@dataclass(frozen=True, slots=True, kw_only=True)
class TokenDelta:
    """instance → gateway: what one step produced for one completion of a request."""

    request_id: str
    """The request the tokens belong to."""
    index: int = 0
    """Which of the request's `n` completions (0-based)."""
    token_ids: list[int] = field(default_factory=list)
    """Tokens generated since the previous delta of this completion."""
    logprobs: list[Logprob] | None = None
    """One entry per token in `token_ids` when the request asked for logprobs, else None."""
    finish_reason: FinishReason | None = None
    """Set on the last delta of this completion only."""
    error: ErrorInfo | None = None
    """Set exactly when finish_reason is "error"."""
    num_prompt_tokens: int = 0
    """Prompt length in tokens."""
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache."""
    num_output_tokens: int = 0
    """Tokens generated so far for this completion, including `token_ids`."""
    drafts: DraftCounts | None = None
    """Set once the completion has speculated (several tokens in one delta are what kept
    drafts look like); None otherwise, which keeps this hot message small."""
    cumulative_logprob: float | None = None
    """Beam search: a beam is sent whole, in one final delta (its `index` = its rank, best
    first), with the sum of its tokens' logprobs here; None for sampled completions."""
