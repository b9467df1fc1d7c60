"""slo-pd's "do no harm under capacity" rule (`policies/spare_capacity.py`): while an
instance of either role can run a whole request predicted within both SLO targets, the
least loaded of them takes it, as colocated least-load would; otherwise the PD rules split
it."""

from __future__ import annotations

from dataclasses import replace

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.placement import Placement, place
from services.scheduler.policies import get_policy
from tests.scheduler.test_slo_pd_limits import CHUNK_STEP, COST, DECODE_STEP, SLO_PD, request, view

TARGETS = dict(slo_ttft=2.0, slo_tpot=0.2)
"""A TPOT target a decode keeps beside a full prefill chunk (~165 ms), and a TTFT target
an idle instance keeps (~0.1 s for the 1,000-token prompt)."""


def pd(*views: InstanceView) -> ClusterSnapshot:
    return ClusterSnapshot(views)


def as_colocated(snapshot: ClusterSnapshot) -> ClusterSnapshot:
    """The same instances, all of role `both`."""
    views = [replace(v, heartbeat=replace(v.heartbeat, role="both")) for v in snapshot.instances]
    return ClusterSnapshot(tuple(views))


def test_under_capacity_the_least_loaded_instance_of_either_role_runs_it_whole():
    s = pd(
        view("p0", "prefill", num_running=2, num_tokens_in_flight=5000),
        view("p1", "prefill", num_running=3, num_tokens_in_flight=4000),
        view("d0", "decode", num_running=4, num_tokens_in_flight=3000),
        view("d1", "decode", num_running=1, num_tokens_in_flight=1000),
    )
    assert TARGETS["slo_tpot"] > CHUNK_STEP
    assert place(request(**TARGETS), s, SLO_PD, COST) == Placement("d1")  # no transfer
    # The instance colocated least-load picks on the same cluster.
    colocated = place(request(**TARGETS), as_colocated(s), get_policy("least-load"), COST)
    assert colocated == Placement("d1")


def test_an_instance_past_the_risk_line_runs_no_whole_request():
    # d0 holds the fewest tokens but 15,000 prompt tokens wait there: 1.6 s predicted, past
    # the risk line of a 2 s target (about 1.05 s), so a miss is at risk there.
    queued = view("d0", "decode", num_tokens_in_flight=100, num_prefill_backlog_tokens=15_000)
    other = view("d1", "decode", num_running=3, num_tokens_in_flight=3000)
    s = pd(view("p0", "prefill", num_running=5, num_tokens_in_flight=9000), queued, other)
    assert place(request(**TARGETS), s, SLO_PD, COST) == Placement("d1")
    # With a target that leaves it room, d0 takes it.
    assert place(request(slo_ttft=10.0, slo_tpot=0.2), s, SLO_PD, COST) == Placement("d0")


def test_where_no_instance_keeps_the_tpot_beside_a_prefill_chunk_the_request_is_split():
    s = pd(view("p0", "prefill"), view("d0", "decode"), view("d1", "decode"))
    tight = request(slo_ttft=2.0, slo_tpot=0.05)  # a decode alone keeps it, not beside a chunk
    assert DECODE_STEP < 0.05 < CHUNK_STEP
    assert place(tight, s, SLO_PD, COST) == Placement("d0", prefill_instance_id="p0")


def test_an_instance_leaving_its_role_runs_no_whole_request():
    leaving = replace(view("d1", "decode"), pending_role="prefill")
    s = pd(view("p0", "prefill", num_tokens_in_flight=2000, num_running=2), leaving)
    # d1 is idle but on its way to prefill (and so no decode instance): p0 runs it whole.
    assert place(request(**TARGETS), s, SLO_PD, COST) == Placement("p0")


def test_without_both_targets_or_a_cost_model_the_pd_rules_place_it():
    s = pd(view("p0", "prefill"), view("d0", "decode", num_tokens_in_flight=10, num_running=1))
    split = Placement("d0", prefill_instance_id="p0")
    assert place(request(slo_ttft=None, slo_tpot=0.2), s, SLO_PD, COST) == split
    # No cost model: no TPOT prediction, so no whole request (nor hybrid decode).
    assert place(request(**TARGETS), s, SLO_PD, None) == split
