"""What a step hands back: one `SequenceOutput` per completion that moved, and the shape
of the step for its statistics. Pure functions of the sequences, after `Scheduler.update`."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.engine.beam_search import BeamResult
from xllm.engine.model_runner import is_decode
from xllm.engine.scheduler import SchedulerOutput
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus
from xllm.engine.speculation import SpeculativeStep
from xllm.protocol.types import Logprob


@dataclass
class SequenceOutput:
    """What one step produced for one completion: the new tokens since the last delta."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[Logprob] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    prefilled: bool = False
    """A prefill-only request's first token: its prompt KV is held until `release_prefilled`."""
    num_draft_tokens: int = 0
    """Speculative drafts verified for this completion so far (cumulative)."""
    num_accepted_draft_tokens: int = 0
    """Of those, the ones kept (cumulative)."""
    cumulative_logprob: float | None = None
    """Beam search: this beam's summed logprob; `token_ids` is then the whole output and
    `index` the beam's rank, best first."""


def sequence_delta(seq: Sequence, num_new_tokens: int = 1) -> SequenceOutput:
    """The last `num_new_tokens` tokens of `seq` (several after a verification)."""
    return SequenceOutput(
        request_id=seq.request_id,
        index=seq.index,
        token_ids=seq.token_ids[-num_new_tokens:],
        logprobs=[seq.logprobs[-1]] if seq.params.logprobs is not None else None,
        finish_reason=seq.finish_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        num_output_tokens=seq.num_output_tokens,
        prefilled=seq.status is SequenceStatus.HELD,
        num_draft_tokens=seq.num_draft_tokens,
        num_accepted_draft_tokens=seq.num_accepted_draft_tokens,
    )


def beam_output(seq: Sequence, index: int, result: BeamResult | None) -> SequenceOutput:
    """The final output of a beam search's `index`-th best beam (empty when fewer beams
    finished than asked for, e.g. an item trie with fewer items that fit)."""
    return SequenceOutput(
        request_id=seq.request_id,
        index=index,
        token_ids=result.token_ids if result else [],
        finish_reason=result.finish_reason if result else FinishReason.LENGTH,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        num_output_tokens=len(result.token_ids) if result else 0,
        cumulative_logprob=result.cumulative_logprob if result else None,
    )


def step_shape(out: SchedulerOutput) -> SpeculativeStep:
    """Measure a scheduled step (before `Scheduler.update` moves the counts on)."""
    decoding = [i for i in out.scheduled if i.draft_token_ids or is_decode(i)]
    num_decode_tokens = sum(i.num_new_tokens for i in decoding)
    return SpeculativeStep(
        num_decodes=len(decoding),
        num_tokens=num_decode_tokens,
        num_draft_tokens=num_decode_tokens - len(decoding),
        num_prefill_tokens=out.num_tokens - num_decode_tokens,
        catch_up_seconds=out.draft_catch_up_seconds,
        draft_prefill_seconds=out.draft_prefill_seconds,
        draft_prefill_tokens=out.draft_prefill_tokens,
        context_tokens=sum(i.seq.num_tokens for i in out.scheduled),
    )
