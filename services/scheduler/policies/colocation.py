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
  (`admits_offline_decode`, the pre-analysis of `decode_limits`); when none does (or there
  is no cost model to predict with), it decodes where it was prefilled, colocated on the
  prefill instance, which runs it as offline work between its prefills.

In a colocated cluster offline work goes to the instance with the most headroom (the least
load in tokens) and is never refused: the engine's priorities protect online work there.
"""

from __future__ import annotations

from collections.abc import Sequence

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest
from services.scheduler.policies.decode_limits import (
    DecodeCost,
    kv_fill_with,
    predicted_decode_step,
    within_limits,
)
from services.scheduler.policies.slo_pd import least_loaded

__all__ = ["DecodeCost", "kv_fill_with", "predicted_decode_step"]

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


def admits_offline_decode(
    view: InstanceView, request: PlacementRequest, cost: DecodeCost | None
) -> bool:
    """May offline `request` decode on strict-pool instance `view`? Only while the KV pool
    stays under `STRICT_KV_SHARE` and the predicted step keeps the TPOT target (no target:
    nothing to keep; no cost model: no prediction, so no): `decode_limits.within_limits`
    with the strict pool's memory share."""
    if cost is None and request.slo_tpot is not None:
        return False
    return within_limits(view, request, cost, kv_share=STRICT_KV_SHARE)


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
