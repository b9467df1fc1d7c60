"""slo-pd's first rule, "do no harm under capacity": while an instance can run a whole
request without a predicted SLO miss, place it there as colocated least-load would.

Disaggregation pays for itself only when prefill chunks would push decodes past the TPOT
target, or prompts queue past the TTFT target. Under capacity neither happens, and a PD
split is only a loss: prompts queue on the prefill half of the instances while the decode
half idles, and decodes crowd onto the decode half, whose steps grow with their batch
(BurstGPT at 6 A100s, all arms at 100% attainment: slo-pd's TTFT p50 was 0.19 s against
colocated's 0.06 s, and its goodput 0.3-1.9% lower; benchmarks/README.md, "SLO-aware PD on
every mix"). So before splitting a request, slo-pd asks each instance, whatever its role,
whether it could run all of it predicted within both targets:

* TTFT: its predicted first token (`TtftPredictor`: the prefill queued there plus this
  prompt) within the risk line (`risk_line`, the line that flips instances to prefill):
  past it the pool is short of prefill capacity and the PD rules take over;
* TPOT: its decodes, this one's included, within the limits of `decode_limits` beside a
  full prefill chunk in every step (the roofline cost model's prediction, as for the
  hybrid roles), so the decodes it already holds keep their target too.

Among those that could, the least loaded takes the request whole (colocated's choice, so
under capacity slo-pd places as colocated does). When none could, a miss is predicted,
and the request is split by the PD rules (`slo_pd.prefill_instance`, `decode_instance`),
the flips following the predicted misses as before. Nothing here is a new constant: the
targets, the risk line and the cost model decide.
"""

from __future__ import annotations

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest
from services.scheduler.policies.decode_limits import DecodeCost, within_limits
from services.scheduler.policies.slo_pd import PD_ROLES, TtftPredictor, least_loaded, risk_line


def whole_request_instance(
    request: PlacementRequest, snapshot: ClusterSnapshot, cost: DecodeCost | None
) -> str | None:
    """The least-loaded instance that could run all of `request` within both SLO targets
    (None: none could, or nothing to predict with: no cost model or no targets)."""
    if cost is None or request.slo_ttft is None or request.slo_tpot is None:
        return None
    pool = snapshot.candidates(request.model, PD_ROLES)
    predictor = TtftPredictor.fit(pool)
    return least_loaded([v for v in pool if _has_room(v, request, predictor, cost)])


def _has_room(
    view: InstanceView, request: PlacementRequest, predictor: TtftPredictor, cost: DecodeCost
) -> bool:
    """`view` could run all of `request`: not leaving its role, its first token predicted
    within the risk line, and its decodes within the limits beside a prefill chunk."""
    if view.pending_role is not None:
        return False
    tokens = request.uncached_tokens(view.instance_id)
    alone = tokens * predictor.seconds_per_token_of(view) + predictor.overhead
    if predictor.predict(view, tokens) > risk_line(request.slo_ttft, alone):  # type: ignore[arg-type]
        return False
    return within_limits(view, request, cost, prefills=True)
