"""The SLO-aware PD policy (report §3.2) as pure functions over hand-made heartbeats: the
TTFT predictor, where each half goes, and the role-flip planner's rules and hysteresis."""

from __future__ import annotations

from dataclasses import replace

import pytest

from services.scheduler.cluster import Registry
from services.scheduler.policies import POLICIES, FlipConfig, PlacementRequest, plan_role_flips
from services.scheduler.policies.slo_pd import TtftPredictor, slo_pd
from tests.scheduler.beats import heartbeat
from xllm.protocol import Heartbeat

SPT = 1e-3  # seconds per prefill token in these heartbeats


def hb(instance_id: str, role: str, backlog: int = 0, **fields) -> Heartbeat:
    typical = dict(
        max_model_len=8192,
        num_prefill_backlog_tokens=backlog,
        prefill_tokens=10_000,
        prefill_seconds=10_000 * SPT,
        ttft_count=10,  # typical prompt: 1000 tokens
    )
    return heartbeat(instance_id, role, **{**typical, **fields})


class Cluster:
    """A `Registry` fed hand-made heartbeats on a fake clock, as the scheduler feeds it."""

    def __init__(self, *beats: Heartbeat):
        self.registry = Registry(timeout=10.0)
        self.now = 0.0
        self.beat(*beats)

    def beat(self, *beats: Heartbeat, after: float = 0.0):
        self.now += after
        for b in beats:
            self.registry.update(b, self.now)
        return self

    def plan(self, config: FlipConfig) -> list[tuple[str, str]]:
        flips = plan_role_flips(self.registry.snapshot(self.now), config)
        for instance_id, role in flips:
            self.registry.note_role(instance_id, role, self.now)
        return flips

    def snapshot(self):
        return self.registry.snapshot(self.now)


def half(role: str, tokens: int = 1000, slo_ttft=None, slo_tpot=None) -> PlacementRequest:
    return PlacementRequest(
        request_id="r",
        num_prompt_tokens=tokens,
        max_tokens=16,
        roles=(role,),
        slo_ttft=slo_ttft,
        slo_tpot=slo_tpot,
    )


# -- predictor --------------------------------------------------------------------------


def test_predictor_fits_time_per_token_from_counters_and_adds_the_queue():
    c = Cluster(hb("p0", "prefill", backlog=2000), hb("p1", "prefill", prefill_seconds=30.0))
    views = c.snapshot().instances
    predictor = TtftPredictor.fit(views, overhead=0.1)
    assert predictor.seconds_per_token == pytest.approx(40.0 / 20_000)
    assert predictor.predict(views[0], 500) == pytest.approx((2000 + 500) * 2e-3 + 0.1)


def test_predictor_counts_work_placed_since_the_heartbeat_and_defaults_without_data():
    c = Cluster(hb("p0", "prefill", backlog=100, prefill_tokens=0, prefill_seconds=0.0))
    c.registry.note_placement("p0", 900)
    (view,) = c.snapshot().instances
    predictor = TtftPredictor.fit([view])
    assert predictor == TtftPredictor()  # nothing measured yet: the defaults
    assert TtftPredictor.queued_tokens(view) == 1000


# -- placement --------------------------------------------------------------------------


def test_prefill_goes_to_the_lowest_predicted_ttft():
    c = Cluster(hb("p0", "prefill", backlog=3000), hb("p1", "prefill", backlog=500))
    assert slo_pd(half("prefill"), c.snapshot()) == "p1"


def test_prefill_prefers_settled_instances_that_meet_the_slo_then_the_flipping_ones():
    # p0 meets 2.5 s (~2 s); d1 flipped but still decodes, and would be faster (~1 s).
    c = Cluster(hb("p0", "prefill", backlog=1000), hb("d1", "decode"))
    c.beat(hb("d1", "prefill", num_decoding=3), after=1.0)
    assert slo_pd(half("prefill", slo_ttft=2.5), c.snapshot()) == "p0"
    # With 1.5 s, p0 misses: the D→P pool's d1 meets it.
    assert slo_pd(half("prefill", slo_ttft=1.5), c.snapshot()) == "d1"
    # Nobody meets 0.5 s: the lowest prediction anyway.
    assert slo_pd(half("prefill", slo_ttft=0.5), c.snapshot()) == "d1"
    # A prefill instance decoding its own requests (hybrid) is no D→P instance.
    c = Cluster(hb("p0", "prefill", backlog=1000), hb("p1", "prefill", num_decoding=3))
    assert slo_pd(half("prefill", slo_ttft=2.5), c.snapshot()) == "p1"


def test_decode_goes_to_the_least_loaded_decode_instance_within_tpot():
    c = Cluster(
        hb("d0", "decode", num_tokens_in_flight=100, num_decoding=2, recent_tpot=0.5),
        hb("d1", "decode", num_tokens_in_flight=900, num_decoding=9, recent_tpot=0.05),
        hb("p0", "prefill"),
    )
    assert slo_pd(half("decode"), c.snapshot()) == "d0"
    assert slo_pd(half("decode", slo_tpot=0.1), c.snapshot()) == "d1"


def test_colocated_requests_go_by_least_load():
    c = Cluster(hb("a", "both", num_tokens_in_flight=50), hb("b", "both"))
    assert slo_pd(half("both"), c.snapshot()) == "b"
    assert "slo-pd" in POLICIES


def test_an_ordered_flip_counts_at_once_for_placement():
    c = Cluster(hb("p0", "prefill"), hb("d0", "decode"), hb("d1", "decode"))
    c.registry.note_role("d1", "prefill", 0.0)
    assert [v.instance_id for v in c.snapshot().candidates("m", ("decode",))] == ["d0"]
    assert slo_pd(half("decode"), c.snapshot()) == "d0"
    # Confirmed by the heartbeat: no longer pending.
    c.beat(hb("d1", "prefill"), after=0.25)
    assert c.snapshot().view("d1").pending_role is None


# -- role flips -------------------------------------------------------------------------

CONFIG = FlipConfig(slo_ttft=2.0, slo_tpot=0.2, min_decode_instances=1, cooldown=3, idle_seconds=2)


def burst_cluster() -> Cluster:
    # Typical prompt 1000 tokens at 1 ms: p0's backlog of 5000 predicts 6 s > 2 s.
    return Cluster(
        hb("p0", "prefill", backlog=5000),
        hb("d0", "decode", num_tokens_in_flight=800),
        hb("d1", "decode", num_tokens_in_flight=200),
    ).beat(after=5.0)  # everyone past the cooldown


def test_ttft_at_risk_flips_the_least_loaded_decode_instance_to_prefill():
    c = burst_cluster()
    assert c.plan(CONFIG) == [("d1", "prefill")]
    assert c.plan(CONFIG) == []  # d1 is on its way; d0 is the last decode instance


def test_min_decode_instances_are_kept():
    c = burst_cluster()
    assert c.plan(replace(CONFIG, min_decode_instances=2)) == []


def test_no_flip_without_a_ttft_target_or_within_it():
    assert burst_cluster().plan(replace(CONFIG, slo_ttft=None)) == []
    # 6 s predicted: within 10 s, but past half the 9 s of waiting it leaves (at risk) ...
    assert burst_cluster().plan(replace(CONFIG, slo_ttft=10.0)) == [("d1", "prefill")]
    # ... and within 20 s with room to spare.
    assert burst_cluster().plan(replace(CONFIG, slo_ttft=20.0)) == []


def test_a_flipped_instance_waits_out_the_cooldown_and_the_idle_time_before_going_home():
    c = burst_cluster()
    assert c.plan(CONFIG) == [("d1", "prefill")]
    c.beat(hb("p0", "prefill", backlog=500), hb("d1", "prefill", backlog=500), after=0.5)
    assert c.plan(CONFIG) == []  # TTFT fine now (1.5 s), but both are busy
    c.beat(hb("p0", "prefill"), hb("d1", "prefill"), after=0.5)  # burst over: idle from t+1
    assert c.plan(CONFIG) == []
    c.beat(hb("p0", "prefill"), hb("d1", "prefill"), after=1.5)  # idle 1.5 s < 2 s
    assert c.plan(CONFIG) == []
    c.beat(hb("p0", "prefill"), hb("d1", "prefill"), after=1.0)  # idle 2.5 s, flipped 3 s ago
    assert c.plan(CONFIG) == [("d1", "decode")]  # home first, though p0 is as idle
    c.beat(hb("p0", "prefill"), hb("d1", "decode"), after=5.0)
    assert c.plan(CONFIG) == []  # one prefill instance left: it stays


def test_a_busy_prefill_instance_resets_its_idle_clock():
    c = burst_cluster()
    c.plan(CONFIG)
    c.beat(hb("p0", "prefill"), hb("d1", "prefill"), after=3.0)
    c.beat(hb("p0", "prefill"), hb("d1", "prefill", backlog=10), after=1.9)
    c.beat(hb("p0", "prefill"), hb("d1", "prefill"), after=0.2)
    assert c.plan(CONFIG) == []  # d1 idle for 0.2 s only
    assert c.snapshot().view("d1").idle_since == pytest.approx(c.now)


def test_tpot_over_target_takes_an_empty_prefill_instance_without_waiting_for_idle():
    c = Cluster(
        hb("p0", "prefill"),
        hb("p1", "prefill", backlog=0),
        hb("d0", "decode", num_decoding=20, recent_tpot=0.5),
    ).beat(after=3.0)
    c.beat(hb("p0", "prefill", backlog=300), after=0.0)
    flips = c.plan(replace(CONFIG, idle_seconds=100))
    assert flips == [("p1", "decode")]  # p0 has queued prefill: not it


def test_no_flip_back_while_ttft_is_at_risk():
    # Typical prompt 5000 tokens: even idle p1 predicts 5 s > 2 s.
    c = Cluster(
        hb("p0", "prefill", backlog=5000, ttft_count=2),
        hb("p1", "prefill", ttft_count=2),
        hb("d0", "decode", num_decoding=20, recent_tpot=0.5, ttft_count=2),
    ).beat(after=5.0)
    assert c.plan(CONFIG) == []  # p1 is idle and TPOT is over, but TTFT wins (and d0 stays)


def test_predictor_prefers_recent_measurements_per_instance_then_the_pool_mean():
    c = Cluster(
        hb("p0", "prefill", backlog=1000, recent_prefill_seconds_per_token=2e-3),
        hb("p1", "prefill", recent_prefill_seconds_per_token=4e-3),
        hb("d1", "prefill", prefill_tokens=0, prefill_seconds=0.0),  # just flipped
    )
    views = {v.instance_id: v for v in c.snapshot().instances}
    predictor = TtftPredictor.fit(views.values(), overhead=0.0)
    assert predictor.seconds_per_token == pytest.approx(3e-3)  # not the lifetime 1e-3
    assert predictor.predict(views["p0"], 500) == pytest.approx(1500 * 2e-3)
    assert predictor.predict(views["d1"], 500) == pytest.approx(500 * 3e-3)


def test_xllm_up_passes_the_slo_options_to_the_scheduler():
    from services.scheduler.__main__ import main
    from xllm.cli.cluster import ClusterConfig, service_specs

    config = ClusterConfig(prefill=1, decode=2, policy="slo-pd", slo_ttft=1.5, flip_idle=1.0)
    specs = {s.name: s for s in service_specs(config, "/m")}
    assert specs["scheduler"].argv[1:] == [
        "-m", "services.scheduler", "--policy", "slo-pd", "--slo-ttft", "1.5", "--flip-idle", "1.0"
    ]  # fmt: skip
    plain = {s.name: s for s in service_specs(ClusterConfig(policy="least-load"), "/m")}
    assert plain["scheduler"].argv[1:] == ["-m", "services.scheduler", "--policy", "least-load"]
    with pytest.raises(SystemExit):
        main(["--policy", "slo-pd", "--min-decode-instances", "0"])


def test_gateway_metrics_show_instances_per_role_and_flips():
    from services.gateway.metrics import GatewayMetrics
    from xllm.protocol import ClusterState

    state = ClusterState(
        instances=[hb("p0", "prefill"), hb("d1", "prefill", role_flips=1), hb("d0", "decode")],
        policy="slo-pd",
        num_submitted=0,
        num_rejected=0,
        num_redispatched=0,
        sent_at=0.0,
        role_counts={"prefill": 2, "decode": 1, "both": 0},
        num_role_flips=1,
    )
    metrics = GatewayMetrics()
    metrics.observe_cluster(state)
    text = metrics.render()
    assert 'xllm_cluster_instances{role="prefill"} 2\n' in text
    assert 'xllm_cluster_instances{role="decode"} 1\n' in text
    assert "xllm_cluster_role_flips 1\n" in text
    assert 'xllm_instance_role_flips{instance="d1",role="prefill"} 1\n' in text


def test_an_idle_flipped_instance_stays_while_the_rest_still_has_a_queue():
    c = burst_cluster()
    assert c.plan(CONFIG) == [("d1", "prefill")]
    # d1 drained its share; p0 still holds the early burst (5 s ahead): d1 must stay.
    c.beat(hb("p0", "prefill", backlog=5000), hb("d1", "prefill"), after=5.0)
    assert c.plan(CONFIG) == []
    c.beat(hb("p0", "prefill"), hb("d1", "prefill"), after=2.5)  # p0 drained too
    assert c.plan(CONFIG) == [("d1", "decode")]


def test_an_ordered_role_that_never_shows_is_forgotten_so_it_can_be_ordered_again():
    from services.scheduler.cluster import PENDING_ROLE_TIMEOUT

    c = burst_cluster()
    assert c.plan(CONFIG) == [("d1", "prefill")]
    c.beat(hb("d1", "decode"), after=1.0)  # SetRoleCmd lost: the instance stays decode
    assert c.snapshot().view("d1").role == "prefill"
    c.beat(hb("d1", "decode"), after=PENDING_ROLE_TIMEOUT)
    view = c.snapshot().view("d1")
    assert (view.role, view.pending_role, view.role_since) == ("decode", None, c.now)


def test_admission_refuses_online_work_whose_ttft_target_is_out_of_reach():
    from services.scheduler.policies.admission import refusal

    online = replace(half("both", slo_ttft=2.0), admission_margin=1.5)  # ~1 s when idle
    busy = hb("p0", "prefill", backlog=50_000)  # 50 s of queued prefill
    assert refusal(online, Cluster(busy, hb("p1", "prefill")).snapshot()) is None
    refused = refusal(online, Cluster(busy).snapshot())
    assert refused is not None and "beyond the 2s target" in refused
    assert refusal(replace(online, priority=1), Cluster(busy).snapshot()) is None  # offline
    assert refusal(replace(online, slo_ttft=None), Cluster(busy).snapshot()) is None
    assert refusal(replace(online, admission_margin=None), Cluster(busy).snapshot()) is None
    near_miss = hb("p2", "prefill", backlog=1800)  # ~2.8 s: a miss, but within the margin
    assert refusal(online, Cluster(near_miss).snapshot()) is None
