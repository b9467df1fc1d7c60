"""Online/offline co-location (`policies.colocation`) and how `placement.place` applies it,
as pure functions over hand-made heartbeats."""

from __future__ import annotations

import pytest

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.cost_model import StepShape, load_model_config, step_time
from services.scheduler.placement import Placement, place
from services.scheduler.policies import PlacementRequest, get_policy
from services.scheduler.policies.colocation import (
    DecodeCost,
    admits_offline_decode,
    predicted_decode_step,
)
from tests.scheduler.beats import heartbeat
from xllm.hardware import SPEC_PROFILES

COST = DecodeCost(load_model_config("qwen3-8b"), SPEC_PROFILES["a100"])
IDLE_STEP = COST.decode_step(1, 1100)
"""One offline sequence (1,000 prompt tokens, 200 out) decoding alone: ~12 ms."""


def view(
    instance_id: str, role: str = "decode", pending: tuple[int, int] = (0, 0), **fields
) -> InstanceView:
    """An instance from its heartbeat's `fields` and (tokens, requests) placed since."""
    fields.setdefault("blocks_free", 10_000)
    hb = heartbeat(instance_id, role, **fields)
    return InstanceView(hb, 0.0, pending_tokens=pending[0], pending_requests=pending[1])


def offline(slo_tpot: float | None = None, prompt: int = 1000, out: int = 200):
    return PlacementRequest(
        request_id="o", num_prompt_tokens=prompt, max_tokens=out, priority=1, slo_tpot=slo_tpot
    )


def test_a_decode_step_cost_depends_only_on_sequences_and_total_context():
    uneven = step_time(COST.model, StepShape(decode_context_lens=(100, 2900, 1000)), COST.hw)
    assert COST.decode_step(3, 4000) == pytest.approx(uneven)


def test_the_prediction_counts_running_queued_reserved_and_just_placed_sequences():
    busy = view(
        "d", num_running=10, num_waiting=2, num_reserved=3, num_reserved_tokens=3000,
        num_tokens_in_flight=20_000, pending=(500, 1),
    )  # fmt: skip
    expected = COST.decode_step(10 + 2 + 3 + 1 + 1, 20_000 + 500 + 3000 + 1000 + 100)
    assert predicted_decode_step(busy, offline(), COST) == pytest.approx(expected)


def test_offline_decode_is_admitted_only_within_the_tpot_target():
    idle = view("d")
    assert admits_offline_decode(idle, offline(slo_tpot=IDLE_STEP * 1.01), COST)
    assert not admits_offline_decode(idle, offline(slo_tpot=IDLE_STEP * 0.99), COST)
    assert admits_offline_decode(idle, offline(slo_tpot=None), None)  # no target to keep
    assert not admits_offline_decode(idle, offline(slo_tpot=1.0), None)  # nothing to predict


def test_offline_decode_leaves_half_the_kv_pool_to_online_work():
    # 2,000 blocks of 16 tokens; the request would hold 1,200 tokens.
    roomy = view("d", blocks_used=900, blocks_free=1100)
    full = view("d", blocks_used=950, blocks_free=1050)
    assert admits_offline_decode(roomy, offline(), None)
    assert not admits_offline_decode(full, offline(), None)


def snapshot(*views: InstanceView) -> ClusterSnapshot:
    return ClusterSnapshot(views)


PD = dict(
    p0=dict(role="prefill", num_tokens_in_flight=5000),
    p1=dict(role="prefill", num_tokens_in_flight=100),
    d0=dict(role="decode", num_tokens_in_flight=50_000, num_running=60),
    d1=dict(role="decode"),
)


def pd_cluster(**changes) -> ClusterSnapshot:
    specs = {name: {**spec, **changes.get(name, {})} for name, spec in PD.items()}
    return snapshot(*(view(name, **spec) for name, spec in specs.items()))


def test_offline_prefill_goes_to_the_relaxed_pool_and_decode_where_it_fits():
    decision = place(offline(slo_tpot=0.05), pd_cluster(), get_policy("slo-pd"), COST)
    assert decision == Placement("d1", prefill_instance_id="p1")


def test_offline_decode_stays_on_its_prefill_instance_when_no_decode_instance_admits_it():
    decision = place(offline(slo_tpot=IDLE_STEP / 2), pd_cluster(), get_policy("slo-pd"), COST)
    assert decision == Placement("p1")  # a GenerateCmd: prefill and decode on p1
    no_model = place(offline(slo_tpot=1.0), pd_cluster(), get_policy("slo-pd"), None)
    assert no_model == Placement("p1")


def test_online_requests_are_placed_by_the_policy_as_before():
    online = PlacementRequest(request_id="r", num_prompt_tokens=100, max_tokens=10)
    decision = place(online, pd_cluster(), get_policy("least-load"), COST)
    assert decision == Placement("d1", prefill_instance_id="p1")


def test_colocated_offline_work_takes_the_most_headroom_and_is_never_shed():
    busy = dict(num_prefill_backlog_tokens=10**9, prefill_tokens=1000, prefill_seconds=1.0)
    snap = snapshot(
        view("a", "both", num_tokens_in_flight=900, **busy),
        view("b", "both", num_tokens_in_flight=300, **busy),
    )
    request = PlacementRequest(
        request_id="o", num_prompt_tokens=100, max_tokens=10, priority=1,
        sequence_number=0, slo_ttft=1.0, admission_margin=1.5,
    )  # fmt: skip
    assert place(request, snap, get_policy("round-robin"), COST) == Placement("b")


def test_the_scheduler_predicts_with_the_cost_model_it_is_given():
    from services.scheduler.config import SchedulerConfig
    from services.scheduler.placement import decode_cost
    from xllm.cli.cluster import ClusterConfig, service_specs

    assert decode_cost(SchedulerConfig()) is None
    assert decode_cost(SchedulerConfig(cost_profile="a100", cost_model="qwen3-8b")) == COST
    config = ClusterConfig(prefill=1, decode=1, cost_profile="a100", cost_model="qwen3-8b")
    argv = {s.name: s for s in service_specs(config, "/m")}["scheduler"].argv
    assert argv[-4:] == ["--cost-profile", "a100", "--cost-model", "qwen3-8b"]


def test_online_ttft_predictions_ignore_offline_prefill_work():
    from services.scheduler.cluster import Registry
    from services.scheduler.policies.slo_pd import TtftPredictor

    registry = Registry(timeout=2.0)
    beat = heartbeat(
        "p", "prefill", num_prefill_backlog_tokens=9000, num_offline_prefill_backlog_tokens=8000
    )
    registry.update(beat, now=0.0)
    registry.note_placement("p", 500)
    registry.note_placement("p", 3000, offline=True)
    (p,) = registry.snapshot().instances
    assert p.load == beat.load.num_tokens_in_flight + 3500  # least-load still sees all the work
    assert TtftPredictor.queued_tokens(p) == 1000 + 500
