"""Pre-analysis of a decode batch (report §3.1, §3.2): may one more sequence decode on an
instance and keep the TPOT target? Pure functions of a heartbeat and the roofline cost model.

Two limits, both from the model config and the hardware profile, none a tuned constant:

* the compute limit: the instance's next decode step, with every sequence it holds and this
  request added (and, on an instance that also prefills, a full prefill chunk beside them,
  as the engine's chunked prefill puts one there whenever a prompt waits), must take no
  longer than the TPOT target. The cost model is monotone in the batch's tokens, so this is
  the report's "total number of tokens in the batch below the computing limit": the limit is
  the largest batch whose predicted step meets the target.
* the memory limit: the request's whole sequence (prompt and output) must fit in the
  instance's KV pool beside what is held there now, so it never waits for blocks there.

The co-location policy (`colocation.py`) uses the same predictions for offline decodes,
with a stricter memory share.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.scheduler.cluster import InstanceView
from services.scheduler.cost_model import StepShape, step_time
from services.scheduler.policies.base import PlacementRequest
from xllm.hardware import HardwareProfile
from xllm.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class DecodeCost:
    """The roofline cost model of the instances' model on their hardware."""

    model: ModelConfig
    hw: HardwareProfile

    def decode_step(self, num_seqs: int, num_context_tokens: int, chunk_tokens: int = 0) -> float:
        """Seconds of a step decoding `num_seqs` sequences holding `num_context_tokens` in
        all, beside a prefill chunk of `chunk_tokens` new tokens (0: none). The cost model
        is linear in each sequence's context, so how the tokens are spread among the
        sequences does not change the time: an even spread is exact."""
        share, rest = divmod(num_context_tokens, num_seqs)
        contexts = (share + 1,) * rest + (share,) * (num_seqs - rest)
        chunks = ((chunk_tokens, 0),) if chunk_tokens > 0 else ()
        shape = StepShape(decode_context_lens=contexts, prefill_chunks=chunks)
        return step_time(self.model, shape, self.hw)

    def prefill_seconds(self, num_tokens: int) -> float:
        """Seconds one instance takes to prefill a prompt of `num_tokens` alone."""
        shape = StepShape(prefill_chunks=((max(num_tokens, 1), 0),), num_prefill_samples=1)
        return step_time(self.model, shape, self.hw)


def batch_with(view: InstanceView, request: PlacementRequest) -> tuple[int, int]:
    """(sequences, context tokens) decoding on `view` once `request` joins: every sequence it
    holds (running, queued, reserved for a prefill elsewhere, or placed since its
    heartbeat) over all their tokens, and `request` at its mean context over its output."""
    load = view.heartbeat.load
    num_seqs = load.num_running + load.num_waiting + load.num_reserved + view.pending_requests + 1
    num_tokens = (
        view.load + load.num_reserved_tokens + request.num_prompt_tokens + request.max_tokens // 2
    )
    return num_seqs, num_tokens


def predicted_decode_step(
    view: InstanceView, request: PlacementRequest, cost: DecodeCost, chunk_tokens: int = 0
) -> float:
    """Seconds of `view`'s decode step with `request` decoding there too (`batch_with`),
    beside a prefill chunk of `chunk_tokens` (0: a decode-only step)."""
    num_seqs, num_tokens = batch_with(view, request)
    return cost.decode_step(num_seqs, num_tokens, max(chunk_tokens - num_seqs, 0))


def kv_fill_with(view: InstanceView, request: PlacementRequest) -> float:
    """The share of `view`'s KV pool in use with `request` there at its full length."""
    kv, block_size = view.heartbeat.kv, view.heartbeat.kv_block_size
    pool = (kv.blocks_used + kv.blocks_free) * block_size
    used = kv.blocks_used * block_size + view.pending_tokens
    return (used + request.num_prompt_tokens + request.max_tokens) / max(pool, 1)


def within_limits(
    view: InstanceView,
    request: PlacementRequest,
    cost: DecodeCost | None,
    *,
    prefills: bool = False,
    kv_share: float = 1.0,
) -> bool:
    """May `request` decode on `view` within both limits? `prefills`: the instance also
    prefills (a hybrid decode on a prefill instance), so a full chunk of its step budget
    shares every step (an unknown budget: no prediction, so no). No TPOT target: only the
    memory limit; no cost model: no compute prediction, so only the memory limit (for a
    decode instance) or no (for a prefilling one)."""
    if kv_fill_with(view, request) > kv_share:
        return False
    max_seqs = view.heartbeat.max_num_seqs
    if max_seqs and batch_with(view, request)[0] > max_seqs:
        return False  # it would wait for a place in the batch, and TPOT with it
    if request.slo_tpot is None:
        return True
    if cost is None:
        return not prefills
    chunk = view.heartbeat.max_num_batched_tokens if prefills else 0
    if prefills and chunk <= 0:
        return False
    return predicted_decode_step(view, request, cost, chunk) <= request.slo_tpot
