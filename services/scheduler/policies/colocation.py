"""Online/offline co-location (report §3.1): where offline work goes, as pure functions.

Requests carry a priority: 0 online, > 0 offline (best effort, no latency target). The
engine already runs online work first and preempts offline work for it; this module decides
which instances offline work may reach at all, so that it does not cost online latency.

In a PD-disaggregated cluster the instances form two pools:

* the latency-relaxed pool, prefill instances: their online work is TTFT-bound, and the
  engine gives an offline prefill only the token budget online work leaves. Offline prefill
  always goes here, to the least-loaded instance.
* the latency-strict pool, decode instances: every step they take is an online TPOT, and
  each sequence added makes every step longer. Offline decode goes to the least-loaded
  decode instance whose next decode step, with this sequence added, the roofline cost model
  predicts within the TPOT target, and whose KV pool stays at most half full
  (`admits_offline_decode`); when none does (or there is no cost model to predict with), it
  decodes where it was prefilled, colocated on the prefill instance, which runs it as
  offline work between its prefills.

In a colocated cluster offline work goes to the instance with the most headroom (the least
load in tokens) and is never refused: the engine's priorities protect online work there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.cost_model import StepShape, step_time
from services.scheduler.hardware import HardwareProfile
from services.scheduler.policies.base import PlacementRequest
from services.scheduler.policies.slo_pd import least_loaded
from xllm.models.config import ModelConfig

RELAXED_POOL = ("prefill",)
"""Roles of the latency-relaxed pool, where offline prefill runs."""
STRICT_POOL = ("decode",)
"""Roles of the latency-strict pool, where offline decode runs only within the TPOT target."""
STRICT_KV_SHARE = 0.5
"""Fill of a strict-pool instance's KV pool past which no offline decode joins it. Its KV is
reserved when the request is placed and held while the prefill waits in the relaxed pool
(behind online prefills, for seconds), and a reservation is never preempted: without a cap,
offline reservations can leave online decodes waiting for blocks. Half the pool is room for
online work to grow into between heartbeats, not a tuned figure."""


@dataclass(frozen=True, slots=True)
class DecodeCost:
    """The roofline cost model of the instances' model on their hardware."""

    model: ModelConfig
    hw: HardwareProfile

    def decode_step(self, num_seqs: int, num_context_tokens: int) -> float:
        """Seconds of a step decoding `num_seqs` sequences holding `num_context_tokens` in
        all. The cost model is linear in each sequence's context, so how the tokens are
        spread among the sequences does not change the time: an even spread is exact."""
        share, rest = divmod(num_context_tokens, num_seqs)
        contexts = (share + 1,) * rest + (share,) * (num_seqs - rest)
        return step_time(self.model, StepShape(decode_context_lens=contexts), self.hw)


def predicted_decode_step(view: InstanceView, request: PlacementRequest, cost: DecodeCost) -> float:
    """Seconds of `view`'s decode step with `request` decoding there too: every sequence it
    holds (running, queued, reserved for a prefill elsewhere, or placed since its
    heartbeat) decodes, over all their tokens, and `request` at its mean context over its
    output."""
    load = view.heartbeat.load
    num_seqs = load.num_running + load.num_waiting + load.num_reserved + view.pending_requests + 1
    num_tokens = (
        view.load + load.num_reserved_tokens + request.num_prompt_tokens + request.max_tokens // 2
    )
    return cost.decode_step(num_seqs, num_tokens)


def kv_fill_with(view: InstanceView, request: PlacementRequest) -> float:
    """The share of `view`'s KV pool in use with `request` there at its full length."""
    kv, block_size = view.heartbeat.kv, view.heartbeat.kv_block_size
    pool = (kv.blocks_used + kv.blocks_free) * block_size
    used = kv.blocks_used * block_size + view.pending_tokens
    return (used + request.num_prompt_tokens + request.max_tokens) / max(pool, 1)


def admits_offline_decode(
    view: InstanceView, request: PlacementRequest, cost: DecodeCost | None
) -> bool:
    """May offline `request` decode on strict-pool instance `view`? Only while the KV pool
    stays under `STRICT_KV_SHARE` and the predicted step keeps the TPOT target (no target:
    nothing to keep; no cost model: no prediction, so no)."""
    if kv_fill_with(view, request) > STRICT_KV_SHARE:
        return False
    if request.slo_tpot is None:
        return True
    if cost is None:
        return False
    return predicted_decode_step(view, request, cost) <= request.slo_tpot


def offline_prefill_instance(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    """The least-loaded instance of the relaxed pool."""
    return least_loaded(snapshot.candidates(request.model, RELAXED_POOL))


def offline_decode_instance(
    request: PlacementRequest, snapshot: ClusterSnapshot, cost: DecodeCost | None
) -> str | None:
    """The least-loaded strict-pool instance admitting `request`'s decode; None: decode it
    where it is prefilled."""
    candidates: Sequence[InstanceView] = snapshot.candidates(request.model, STRICT_POOL)
    return least_loaded([v for v in candidates if admits_offline_decode(v, request, cost)])


def most_headroom(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    """Colocated: the instance with the least load in tokens."""
    return least_loaded(snapshot.candidates(request.model, ("both",)))
