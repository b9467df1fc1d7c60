"""slo-pd's rules with the cost model (report §3.2), as pure functions over hand-made
heartbeats: the decode pre-analysis (memory, batch and compute limits), the hybrid roles
(decoding on the prefill instance, a decode instance running a whole request), the two
decode instances kept, the flips driven by predicted misses with a hysteresis in service
times, and early rejection (SLO admission) when the TTFT will be missed anyway."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.scheduler.cluster import ClusterSnapshot, InstanceView, Registry
from services.scheduler.cost_model import load_model_config
from services.scheduler.placement import Placement, Refusal, place
from services.scheduler.policies import FlipConfig, PlacementRequest, get_policy, plan_role_flips
from services.scheduler.policies.decode_limits import DecodeCost, predicted_decode_step
from services.scheduler.policies.slo_pd import TtftPredictor, service_time
from tests.scheduler.beats import heartbeat
from xllm.hardware import SPEC_PROFILES, load_profile
from xllm.protocol import ErrorCode

COST = DecodeCost(load_model_config("qwen3-8b"), SPEC_PROFILES["a100"])
CHUNK = 2048
CHUNK_STEP = COST.decode_step(1, 1100, CHUNK - 1)
"""A step of one decode beside a full 2,048-token prefill chunk: ~165 ms on an A100."""
DECODE_STEP = COST.decode_step(1, 1100)
"""The same decode alone: ~12 ms."""
SPT = 1e-4  # seconds per prefill token in these heartbeats
SLO_PD = get_policy("slo-pd")


def view(instance_id: str, role: str, pending: tuple[int, int] = (0, 0), **fields) -> InstanceView:
    """An instance of the engine's default shape from its heartbeat's `fields` and (tokens,
    requests) placed since."""
    defaults = dict(
        blocks_free=100_000,
        max_num_batched_tokens=CHUNK,
        max_num_seqs=64,
        prefill_tokens=100_000,
        prefill_seconds=100_000 * SPT,
        ttft_count=100,  # typical prompt: 1,000 tokens, 0.1 s
    )
    hb = heartbeat(instance_id, role, **{**defaults, **fields})
    return InstanceView(
        hb, 0.0, started_as=role, pending_tokens=pending[0], pending_requests=pending[1]
    )


def request(slo_tpot: float = 0.05, slo_ttft: float | None = None, **kw) -> PlacementRequest:
    fields = dict(request_id="r", num_prompt_tokens=1000, max_tokens=200)
    return PlacementRequest(slo_tpot=slo_tpot, slo_ttft=slo_ttft, **{**fields, **kw})


def pd(*views: InstanceView) -> ClusterSnapshot:
    return ClusterSnapshot(views)


# -- decode placement: the limits -----------------------------------------------------------


def test_decode_goes_to_the_decode_instance_with_the_fewest_running_tokens():
    s = pd(
        view("p0", "prefill"),
        view("d0", "decode", num_tokens_in_flight=9000, num_running=9),
        view("d1", "decode", num_tokens_in_flight=3000, num_running=3),
        view("d2", "decode", num_reserved=4, num_reserved_tokens=8000),  # reserved count too
    )
    assert place(request(), s, SLO_PD, COST) == Placement("d1", prefill_instance_id="p0")


def test_the_memory_limit_skips_a_decode_instance_the_request_would_not_fit():
    # 100 blocks of 16 tokens: 1,600 tokens, 500 in use; the request needs 1,200.
    full = view("d0", "decode", blocks_used=30, blocks_free=70)
    roomy = view("d1", "decode", num_tokens_in_flight=40_000, num_running=30)
    assert (
        place(request(), pd(view("p0", "prefill"), full, roomy), SLO_PD, COST).instance_id == "d1"
    )


def test_the_compute_limit_skips_a_decode_instance_whose_step_would_miss_the_tpot():
    # On a compute-bound CPU every sequence costs a pass over the weights: d0 holds fewer
    # tokens than d1 (3,000 against 20,000) but in 30 sequences, so its step is longer.
    cpu = DecodeCost(COST.model, load_profile("cpu-local"))
    many = view("d0", "decode", num_running=30, num_tokens_in_flight=3000)
    long = view("d1", "decode", num_running=1, num_tokens_in_flight=20_000)
    req = request()
    slow, fast = (predicted_decode_step(v, req, cpu) for v in (many, long))
    assert fast < slow
    s = pd(view("p0", "prefill"), many, long)
    assert place(replace(req, slo_tpot=slow * 1.01), s, SLO_PD, cpu).instance_id == "d0"
    assert place(replace(req, slo_tpot=slow * 0.99), s, SLO_PD, cpu).instance_id == "d1"


def test_the_batch_limit_skips_a_decode_instance_with_no_place_left():
    full = view("d0", "decode", num_running=64, num_tokens_in_flight=64)
    other = view("d1", "decode", num_running=10, num_tokens_in_flight=30_000)
    assert (
        place(request(), pd(view("p0", "prefill"), full, other), SLO_PD, COST).instance_id == "d1"
    )


# -- the hybrid roles -----------------------------------------------------------------------


def test_the_prefill_instance_decodes_what_the_decode_pool_cannot_within_the_tpot():
    full = view("d0", "decode", num_running=64, num_tokens_in_flight=64)
    s = pd(view("p0", "prefill"), full)
    # A decode beside a full chunk (~165 ms) keeps a 200 ms target: hybrid, no transfer.
    assert place(request(slo_tpot=0.2), s, SLO_PD, COST) == Placement("p0")
    assert CHUNK_STEP < 0.2
    # A 50 ms target it would not keep: the decode pool's least loaded, at a wait.
    assert place(request(slo_tpot=0.05), s, SLO_PD, COST) == Placement(
        "d0", prefill_instance_id="p0"
    )
    # Without the chunk budget in its heartbeat, nothing to predict with: no hybrid.
    unknown = view("p0", "prefill", max_num_batched_tokens=0)
    assert place(request(slo_tpot=0.2), pd(unknown, full), SLO_PD, COST).instance_id == "d0"


def test_a_decode_instance_runs_a_whole_request_when_the_prefill_pool_is_at_risk():
    queued = view("p0", "prefill", num_prefill_backlog_tokens=15_000)  # 1.5 s ahead
    d0 = view("d0", "decode", num_running=2, num_tokens_in_flight=2000)
    s = pd(queued, d0)
    # 1.6 s predicted against 2 s: within the target, but past half the waiting it leaves.
    assert place(request(slo_tpot=0.2, slo_ttft=2.0), s, SLO_PD, COST) == Placement("d0")
    # Far from risk, it runs whole where the least is held (test_slo_pd_spare.py): p0.
    assert place(request(slo_tpot=0.2, slo_ttft=10.0), s, SLO_PD, COST) == Placement("p0")
    # Not if d0's decodes would miss the TPOT beside a prefill chunk.
    assert place(request(slo_tpot=0.05, slo_ttft=2.0), s, SLO_PD, COST).prefill_instance_id == "p0"


# -- early rejection ------------------------------------------------------------------------


def test_a_request_that_will_miss_its_ttft_anyway_is_refused_at_once():
    queued = view("p0", "prefill", num_prefill_backlog_tokens=30_000)  # 3 s ahead
    busy = view("d0", "decode", num_running=64, num_tokens_in_flight=64)
    req = request(slo_tpot=0.2, slo_ttft=2.0, admission_margin=1.0)
    refused = place(req, pd(queued, busy), SLO_PD, COST)
    assert isinstance(refused, Refusal) and refused.code is ErrorCode.OVERLOADED
    # A decode instance that can run it in place, in time, saves it.
    idle = view("d1", "decode")
    assert place(req, pd(queued, busy, idle), SLO_PD, COST) == Placement("d1")
    # Admission off: placed, late.
    assert isinstance(
        place(replace(req, admission_margin=None), pd(queued, busy), SLO_PD, COST), Placement
    )


def test_outputs_placed_since_the_heartbeat_are_no_prefill_queue():
    registry = Registry(timeout=10.0)
    registry.update(view("p0", "prefill").heartbeat, 0.0)
    registry.note_placement("p0", 1000 + 200, num_outputs=200)  # a hybrid placement
    predictor = TtftPredictor(SPT)
    assert predictor.queued_tokens(registry.snapshot().view("p0")) == 1000


# -- role flips -----------------------------------------------------------------------------

CONFIG = FlipConfig(slo_ttft=2.0, slo_tpot=0.05, cooldown=0.0, idle_seconds=0.0)


def cluster(*beats, now: float = 100.0) -> Registry:
    registry = Registry(timeout=1e9)
    for b in beats:
        registry.update(b.heartbeat, 0.0)
    registry.update(beats[0].heartbeat, now)  # the clock moves on
    return registry


def test_two_decode_instances_are_kept_by_default():
    burst = view("p0", "prefill", num_prefill_backlog_tokens=50_000)  # 5 s ahead
    two = cluster(burst, view("d0", "decode"), view("d1", "decode"))
    assert FlipConfig().min_decode_instances == 2
    assert plan_role_flips(two.snapshot(), CONFIG, COST) == []
    three = cluster(burst, view("d0", "decode"), view("d1", "decode"), view("d2", "decode"))
    assert plan_role_flips(three.snapshot(), CONFIG, COST) == [("d0", "prefill")]


def test_a_predicted_tpot_miss_in_the_decode_pool_flips_an_idle_prefill_instance():
    full = [view(f"d{i}", "decode", num_running=64, num_tokens_in_flight=64) for i in range(2)]
    registry = cluster(view("p0", "prefill"), view("p1", "prefill"), *full)
    assert plan_role_flips(registry.snapshot(), CONFIG, COST) == [("p0", "decode")]
    # With room in the decode pool, an idle prefill instance stays: it can decode in place.
    roomy = cluster(view("p0", "prefill"), view("p1", "prefill"), *full[:1], view("d1", "decode"))
    assert plan_role_flips(roomy.snapshot(), CONFIG, COST) == []


def test_the_hysteresis_is_counted_in_predicted_service_times():
    burst = view("p0", "prefill", num_prefill_backlog_tokens=50_000)
    decode = [view(f"d{i}", "decode") for i in range(3)]
    predictor = TtftPredictor.fit([burst, *decode])
    unit = service_time(predictor, 1000)
    assert unit == pytest.approx(1000 * SPT + predictor.overhead)
    config = replace(CONFIG, hysteresis=20.0)
    early = cluster(burst, *decode, now=19 * unit)
    assert plan_role_flips(early.snapshot(), config, COST) == []  # 19 service times in
    late = cluster(burst, *decode, now=21 * unit)
    assert plan_role_flips(late.snapshot(), config, COST) == [("d0", "prefill")]
