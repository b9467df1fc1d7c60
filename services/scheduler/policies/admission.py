"""SLO admission (report §3.1): refuse at once an online request that would miss its TTFT
target anyway, instead of queueing it where it delays others and misses all the same.

`refusal(request, snapshot) -> str | None` is a pure function, run by the live scheduler
(the refusal becomes OVERLOADED: HTTP 429 with Retry-After) and by the simulator.
Only online requests (priority 0) with a TTFT target are refused; offline work has no
latency target and waits. A request is refused when even its best instance, the one with
the lowest predicted TTFT among those that can prefill it (slo-pd's predictor: the prefill
tokens queued there plus this prompt's uncached ones, at the measured time per token), is
predicted to take more than the request's `admission_margin` × the target (the
scheduler's `--slo-admission`; off by default). The margin guards against refusing on an
estimate's noise (a refusal a short wait would have avoided is a loss too); 1.5 is well
outside the predictor's calibration error (held-out error under 5% in
tests/sim/test_calibration.py). It is not tuned to a trace.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest
from services.scheduler.policies.slo_pd import TtftPredictor

PREFILLING_ROLES = ("prefill", "both")


def refusal(
    request: PlacementRequest, snapshot: ClusterSnapshot, hosts: Sequence[InstanceView] = ()
) -> str | None:
    """Why `request` is refused (None: place it). `hosts`: instances of other roles the
    policy may also prefill it on (slo-pd's decode instances running a request in place)."""
    margin = request.admission_margin
    if request.priority > 0 or request.slo_ttft is None or margin is None:
        return None
    prefilling = snapshot.candidates(request.model, PREFILLING_ROLES)
    if not prefilling:
        return None  # nothing to predict with: placement says what is missing
    predictor = TtftPredictor.fit(prefilling)
    candidates = [*prefilling, *hosts]
    best = min(predictor.predict(v, request.uncached_tokens(v.instance_id)) for v in candidates)
    if best <= margin * request.slo_ttft:
        return None
    return (
        f"overloaded: the earliest first token is predicted in {best:.1f}s, beyond the "
        f"{request.slo_ttft:g}s target; retry later"
    )
