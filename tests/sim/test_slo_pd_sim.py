"""slo-pd in the simulator: the live scheduler's code path (SLO targets in placements, the
rebalancer's round every `PLAN_INTERVAL`), the heartbeat fields it reads, and the flips
of the live test `tests/e2e/test_slo_pd_cluster.py` under the same kind of burst."""

from __future__ import annotations

import pytest

from services.scheduler import service
from services.scheduler.config import SchedulerConfig
from services.scheduler.cost_model import StepShape, load_model_config, step_time
from services.scheduler.policies import POLICIES_FLIPPING_ROLES, get_policy
from services.scheduler.rebalance import PLAN_INTERVAL, flip_config
from services.scheduler.sim import simulator
from services.scheduler.sim.instance import InstanceSpec, SimInstance, SimRequest
from services.scheduler.sim.report import Slo, summarize
from services.scheduler.sim.simulator import ClusterSpec, Simulator
from xllm.hardware import SPEC_PROFILES

MODEL = load_model_config("qwen3-8b")
HW = SPEC_PROFILES["a100"]
SPEC = InstanceSpec(num_kv_blocks=8192, block_size=16, max_num_batched_tokens=2048)
PROMPT_TOKENS = 1000
ONE_PREFILL = step_time(
    MODEL, StepShape(prefill_chunks=((PROMPT_TOKENS, 0),), num_prefill_samples=1), HW
)
"""Seconds one instance takes to prefill one burst prompt alone (~85 ms on an A100)."""
SLO_TTFT = 4 * ONE_PREFILL
"""Met by an idle instance, missed by one with a queue of 20 prompts (as live: 1.5 s)."""
WAVES = (20, 8)
BURST = 3.0
"""When the burst starts: after the decode instances' first `flip_cooldown` (2 s)."""


def sim_for(policy: str, roles: tuple[str, ...], **options) -> Simulator:
    """The simulator as `xllm sim` builds it for `policy` (see `run.simulator_for`)."""
    config = SchedulerConfig(policy=policy, **options)
    return Simulator(
        MODEL,
        HW,
        ClusterSpec(roles, SPEC),
        get_policy(policy),
        targets=flip_config(config),
        flip_roles=policy in POLICIES_FLIPPING_ROLES,
    )


def req(i, arrival, prompt=PROMPT_TOKENS, output=8):
    return SimRequest(f"r{i}", arrival, prompt, output)


def test_the_simulator_runs_the_live_schedulers_functions():
    assert simulator.rebalance is service.rebalance
    assert simulator.place is service.place and simulator.note is service.note
    assert simulator.placement_request is service.placement_request
    assert simulator.PLAN_INTERVAL == service.PLAN_INTERVAL == PLAN_INTERVAL


def test_placements_carry_the_slo_targets_as_live():
    seen = []
    policy = get_policy("least-load")

    def spy(request, snapshot):
        seen.append((request.slo_ttft, request.slo_tpot))
        return policy(request, snapshot)

    config = SchedulerConfig(slo_ttft=1.5, slo_tpot=0.1)
    sim = Simulator(MODEL, HW, ClusterSpec(("both",), SPEC), spy, targets=flip_config(config))
    sim.run([req(0, 0.0)])
    assert seen == [(1.5, 0.1)]


def test_heartbeats_carry_the_step_stats_and_the_prefill_backlog():
    inst = SimInstance("a", SPEC)
    inst.add(SimRequest("d", 0.0, 10, 100), now=0.0)  # decodes from the second step on
    inst.update(inst.schedule(), 0.1, seconds=0.1)  # its prefill: 10 tokens, first token
    inst.add(SimRequest("p", 0.1, 3000, 4), now=0.1)
    hb = inst.heartbeat(0.1)
    assert (hb.load.num_prefill_backlog_tokens, hb.load.num_decoding) == (3000, 1)
    assert (hb.steps.prefill_tokens, hb.steps.prefill_seconds) == (10, pytest.approx(0.1))
    assert hb.steps.recent_prefill_seconds_per_token == pytest.approx(0.01)
    assert (hb.steps.ttft_count, hb.steps.ttft_seconds) == (1, pytest.approx(0.1))
    assert (hb.steps.decode_steps, hb.steps.recent_tpot) == (0, 0.0)

    step = inst.schedule()  # 1 decode + a 2,047-token chunk, as the engine would
    assert step.shape.decode_context_lens == (11,)
    inst.update(step, 1.1, seconds=1.0)
    hb = inst.heartbeat(1.1)
    assert hb.load.num_prefill_backlog_tokens == 3000 - 2047
    assert hb.steps.prefill_tokens == 10 + 2047
    assert hb.steps.prefill_seconds == pytest.approx(0.1 + 2047 / 2048)  # split by token share
    assert (hb.steps.decode_steps, hb.steps.decode_seconds, hb.steps.recent_tpot) == (1, 1.0, 1.0)
    assert hb.steps.ttft_count == 1  # the long prompt has no first token yet

    inst.update(inst.schedule(), 1.6, seconds=0.5)
    hb = inst.heartbeat(1.6)
    assert (hb.load.num_prefill_backlog_tokens, hb.load.num_decoding) == (0, 2)
    assert (hb.steps.ttft_count, hb.steps.ttft_seconds) == (2, pytest.approx(0.1 + 1.5))


def test_a_pd_run_fills_the_heartbeats_the_policy_reads():
    # A TPOT target a decode meets alone (~12 ms) but not beside a prefill chunk (~90 ms):
    # no instance can run a whole request, so each is split.
    sim = sim_for("slo-pd", ("prefill", "decode"), slo_ttft=10.0, slo_tpot=0.05)
    done = sim.run([req(i, i * 0.05, output=20) for i in range(10)])
    assert all(r.finished_at is not None for r in done)
    views = {v.instance_id: v.heartbeat for v in sim.registry.snapshot().instances}
    p, d = views["inst-000"], views["inst-001"]
    assert p.steps.ttft_count == 10 and p.steps.prefill_tokens == 10 * PROMPT_TOKENS
    assert p.steps.prefill_seconds > 0 and p.steps.recent_prefill_seconds_per_token > 0
    assert p.steps.decode_steps == 0  # a prefill instance only prefills
    assert (
        d.steps.ttft_count == 0 and d.steps.prefill_tokens == 0
    )  # its first tokens came with the KV
    assert d.steps.decode_steps > 0 and d.steps.recent_tpot > 0
    assert sim.num_role_flips == 0  # a light load: nothing to rebalance


def test_a_burst_flips_a_decode_instance_to_prefill_and_back():
    """The live test's scenario: 1 prefill + 2 decode instances, slo-pd, a burst of long
    prompts in two waves; requests decoding on the instance that flips finish there. (The
    flip back for idleness is the rule without a cost model: the unit tests and the live
    test `tests/e2e/test_slo_pd_cluster.py` show it.)"""
    sim = sim_for(
        "slo-pd",
        ("prefill", "decode", "decode"),
        slo_ttft=SLO_TTFT,
        # Met by decodes alone, missed beside a prefill chunk: the warm-up requests are split
        # (no instance runs them whole), and the flips under test are TTFT's.
        slo_tpot=0.05,
        min_decode_instances=1,
        flip_cooldown=2.0,
        flip_idle=1.0,
    )
    # Long decodes running on both decode instances when the burst comes.
    warmup = [req(i, 0.0, prompt=300, output=2000) for i in range(4)]
    first = [req(10 + i, BURST) for i in range(WAVES[0])]
    second = [req(100 + i, BURST + 2 * PLAN_INTERVAL + 0.01) for i in range(WAVES[1])]
    done = sim.run([*warmup, *first, *second], until=30.0)

    assert all(r.finished_at is not None and not r.rejected for r in done)
    # With the cost model (the simulator always has one) an idle prefill instance does not
    # flip back for idleness: it takes the decodes the decode pool cannot (hybrid).
    assert [(i, role) for _, i, role in sim.flips] == [(sim.flips[0][1], "prefill")], sim.flips
    flipped = sim._by_id[sim.flips[0][1]]
    assert flipped.instance_id != "inst-000"  # the prefill instance stays prefill
    assert BURST <= sim.flips[0][0] <= BURST + 2 * PLAN_INTERVAL  # placements count at once
    assert flipped.role_flips == 1 and sim.num_role_flips == 1
    assert flipped.step_stats.ttft_count > 0, "the flipped instance served prefills"
    stayed = [r for r in warmup if r.decode_instance_id == flipped.instance_id]
    assert stayed and all(r.finished_at > sim.flips[0][0] for r in stayed)  # finished in place
    # The burst's TTFT is better than on the prefill instance alone.
    report = summarize("slo-pd", done, sim.instances, Slo(SLO_TTFT, 0.05))
    assert report.role_flips == 1 and report.final_roles == "2P:1D"
    alone = sim_for("least-load", ("prefill", "decode", "decode"), slo_ttft=SLO_TTFT)
    base = alone.run(
        [req(r.request_id, r.arrival, r.num_prompt_tokens, r.output_len) for r in done]
    )
    assert alone.num_role_flips == 0
    worst = max(r.first_token_at - r.arrival for r in done)
    assert worst < max(r.first_token_at - r.arrival for r in base)


def test_under_capacity_slo_pd_runs_as_colocated_and_splits_past_it():
    """'Do no harm under capacity' (policies/spare_capacity.py): on a light load, slo-pd
    from a 2P:2D start places every request where colocated least-load does, whole, and
    every token comes when colocated's does; a burst past capacity it splits."""
    light = [req(i, 0.3 * i, prompt=500, output=50) for i in range(30)]
    times = {}
    for policy, roles in (
        ("least-load", ("both",) * 4),
        ("slo-pd", ("prefill",) * 2 + ("decode",) * 2),
    ):
        sim = sim_for(policy, roles, slo_ttft=2.0, slo_tpot=0.2)
        done = sim.run([SimRequest(r.request_id, r.arrival, 500, 50) for r in light])
        times[policy] = [
            (r.instance_id, r.decode_instance_id, r.first_token_at, r.finished_at) for r in done
        ]
    assert times["slo-pd"] == times["least-load"]
    assert all(decode is None for _, decode, _, _ in times["slo-pd"])  # no KV moved

    sim = sim_for("slo-pd", ("prefill",) * 2 + ("decode",) * 2, slo_ttft=2.0, slo_tpot=0.2)
    burst = [req(i, 0.0, prompt=4000, output=50) for i in range(60)]
    done = sim.run(burst)
    assert any(r.decode_instance_id is not None for r in done)  # past capacity: split
