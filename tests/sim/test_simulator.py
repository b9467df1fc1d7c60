"""The simulator on hand-checkable traces: one request, one instance; placement through
the live policies; heartbeats and pending placements; prefix hits; PD hand-over."""

from __future__ import annotations

import dataclasses
from collections import Counter

import pytest

from services.scheduler.cluster import ClusterSnapshot
from services.scheduler.cost_model import (
    StepShape,
    kv_transfer_time,
    load_model_config,
    step_time,
)
from services.scheduler.policies import (
    POLICIES,
    POLICIES_USING_PREFIX_HITS,
    PlacementRequest,
    get_policy,
)
from services.scheduler.sim.instance import InstanceSpec, SimInstance, SimRequest
from services.scheduler.sim.report import Slo, percentile, summarize
from services.scheduler.sim.simulator import ClusterSpec, Simulator
from xllm.hardware import SPEC_PROFILES

MODEL = load_model_config("qwen3-0.6b")
HW = SPEC_PROFILES["a100"]
SPEC = InstanceSpec(num_kv_blocks=4096, block_size=16, max_num_batched_tokens=2048)


def run(requests, instances=1, policy="round-robin", spec=SPEC, roles=None, prefix_hits=None):
    cluster = ClusterSpec(roles, spec) if roles else ClusterSpec.colocated(instances, spec)
    if prefix_hits is None:
        prefix_hits = policy in POLICIES_USING_PREFIX_HITS
    policy_fn = get_policy(policy) if isinstance(policy, str) else policy
    sim = Simulator(MODEL, HW, cluster, policy_fn, uses_prefix_hits=prefix_hits)
    return sim.run(requests), sim


def req(i, arrival=0.0, prompt=100, output=5, hash_ids=()):
    return SimRequest(f"r{i}", arrival, prompt, output, hash_ids)


def test_one_request_ttft_is_its_prefill_step_and_tpot_its_decode_steps():
    (r,), _ = run([req(0, arrival=1.0, prompt=100, output=5)])
    prefill = step_time(MODEL, StepShape(prefill_chunks=((100, 0),), num_prefill_samples=1), HW)
    decodes = [
        step_time(MODEL, StepShape(decode_context_lens=(c,)), HW) for c in (101, 102, 103, 104)
    ]
    assert r.first_token_at - r.arrival == pytest.approx(prefill)
    assert r.finished_at - r.first_token_at == pytest.approx(sum(decodes))
    report = summarize("x", [r], [], Slo(ttft=prefill * 1.01, tpot=1.0))
    assert report.slo_attainment == 1.0
    assert report.tpot_p50 == pytest.approx(sum(decodes) / 4)


def test_a_long_prompt_is_prefilled_in_chunks_of_the_token_budget():
    (r,), _ = run([req(0, prompt=3000, output=1)])
    chunks = [
        StepShape(prefill_chunks=((2048, 0),)),
        StepShape(prefill_chunks=((952, 2048),), num_prefill_samples=1),
    ]
    assert r.first_token_at == pytest.approx(sum(step_time(MODEL, s, HW) for s in chunks))
    assert r.finished_at == r.first_token_at  # one output token: done at the first


def test_decodes_go_first_and_a_new_prompt_shares_their_step():
    inst = SimInstance("a", SPEC)
    inst.add(req(0, prompt=10, output=10))
    inst.update(inst.schedule(), 0.0)  # prefill, first token
    inst.add(req(1, prompt=3000))
    shape = inst.schedule().shape
    assert shape.decode_context_lens == (11,)
    assert shape.prefill_chunks == ((2047, 0),)  # the budget left after one decode


def test_round_robin_spreads_requests_evenly():
    requests = [req(i, arrival=i * 10.0) for i in range(8)]
    done, _ = run(requests, instances=4)
    assert Counter(r.instance_id for r in done) == {f"inst-00{i}": 2 for i in range(4)}


def test_least_load_sees_pending_placements_within_a_burst():
    # 8 requests in the same instant: no heartbeat in between, so only the registry's
    # pending counts keep least-load from sending all of them to the same instance.
    done, _ = run([req(i, arrival=5.0) for i in range(8)], instances=4, policy="least-load")
    assert Counter(r.instance_id for r in done) == {f"inst-00{i}": 2 for i in range(4)}


def test_heartbeats_are_stale_by_up_to_one_interval():
    # One long request lands on inst-000; the next arrives before inst-000's next heartbeat:
    # the snapshot still shows its pending placement, not its running load.
    seen = []

    def spy(request: PlacementRequest, snapshot: ClusterSnapshot):
        seen.append(
            {
                v.instance_id: (v.heartbeat.load.num_running, v.pending_requests)
                for v in snapshot.instances
            }
        )
        return "inst-000"

    run(
        [req(0, arrival=1.0, output=1000), req(1, arrival=1.01, output=1000), req(2, arrival=2.0)],
        instances=2,
        policy=spy,
    )
    assert seen[1]["inst-000"] == (0, 1)  # heartbeat not yet sent: pending only
    assert seen[2]["inst-000"][0] == 2 and seen[2]["inst-000"][1] == 0  # fresh heartbeat


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_registered_policy_is_called_for_every_request(name, monkeypatch):
    calls = []
    policy = POLICIES[name]

    def counted(request, snapshot):
        calls.append(request.sequence_number)
        return policy(request, snapshot)

    requests = [req(i, arrival=i * 0.1) for i in range(20)]
    done, _ = run(requests, instances=3, policy=counted)
    assert len(calls) == 20
    assert all(r.finished_at is not None for r in done)


def test_a_prefix_hit_skips_its_prefill():
    blocks = (7, 8, 9)
    first, second = (
        req(0, prompt=1500, output=1, hash_ids=blocks),
        req(1, arrival=10.0, prompt=1500, output=1, hash_ids=blocks),
    )
    _done, sim = run([first, second])
    assert second.num_cached_tokens == 1024  # 2 full 512-token blocks; the third is partial
    assert second.first_token_at - second.arrival < first.first_token_at - first.arrival
    assert sim.instances[0].prefix_hit_tokens == 1024


def test_policies_that_read_prefix_hits_get_them_from_caches_and_recent_placements():
    seen = []

    def spy(request, snapshot):
        seen.append(dict(request.prefix_hits))
        return "inst-001"

    blocks = (1, 2, 3)
    run(
        [
            req(0, prompt=1600, output=1, hash_ids=blocks),
            req(1, arrival=0.0, prompt=1600, output=1, hash_ids=blocks),  # not computed yet
            req(2, arrival=5.0, prompt=1600, output=1, hash_ids=blocks),  # cached by now
        ],
        instances=2,
        policy=spy,
        prefix_hits=True,
    )
    # Instances with no hit are left out; req 1 hits through RecentPlacements alone.
    assert seen == [{}, {"inst-001": 1536}, {"inst-001": 1536}]


def test_cache_aware_keeps_a_shared_prefix_together_and_hits_it():
    blocks = (11, 12, 13, 14)
    requests = [req(i, arrival=i * 0.5, prompt=2100, output=2, hash_ids=blocks) for i in range(4)]
    done, _ = run(requests, instances=4, policy="cache-aware")
    assert len({r.instance_id for r in done}) == 1
    assert [r.num_cached_tokens for r in done] == [0, 2048, 2048, 2048]


def test_kv_pool_pressure_preempts_and_still_finishes_everything():
    tight = dataclasses.replace(SPEC, num_kv_blocks=40)  # 640 tokens for ~6 x 200
    done, sim = run([req(i, prompt=150, output=50) for i in range(6)], spec=tight)
    assert all(r.finished_at is not None for r in done)
    assert sim.instances[0].num_preemptions > 0


def test_pd_places_both_halves_with_the_policy_and_hands_the_kv_over():
    (r,), sim = run([req(0, prompt=1000, output=3)], roles=("prefill", "decode"))
    prefill = step_time(MODEL, StepShape(prefill_chunks=((1000, 0),), num_prefill_samples=1), HW)
    transfer = kv_transfer_time(MODEL, 1000, HW)
    decodes = [step_time(MODEL, StepShape(decode_context_lens=(c,)), HW) for c in (1001, 1002)]
    assert (r.instance_id, r.decode_instance_id) == ("inst-000", "inst-001")
    assert r.first_token_at == pytest.approx(prefill)
    assert r.finished_at == pytest.approx(prefill + transfer + sum(decodes))
    assert sim.instances[1].step_stats.num_steps == 2


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_runs_a_disaggregated_cluster(name):
    requests = [req(i, arrival=i * 0.05, prompt=600, output=4) for i in range(12)]
    done, sim = run(requests, policy=name, roles=("prefill",) * 2 + ("decode",) * 2)
    assert all(r.finished_at is not None and not r.rejected for r in done)
    assert {r.decode_instance_id for r in done} <= {"inst-002", "inst-003"}
    assert sum(i.step_stats.num_steps for i in sim.instances[2:]) > 0


def test_percentile_interpolates_like_numpy():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([1, 2, 3, 4], 90) == pytest.approx(3.7)


def test_xllm_sim_runs_every_policy_on_a_trace_file_and_prints_a_table(tmp_path, capsys):
    import json

    from xllm.cli import main

    rows = [
        {"timestamp": 100 * i, "input_length": 700, "output_length": 4, "hash_ids": [0, 1 + i % 3]}
        for i in range(30)
    ]
    trace = tmp_path / "mini_trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sim", "--trace", str(trace), "--instances", "2,3", "--profile", "a100"]
    assert main([*argv, "--slo-ttft", "1", "--slo-tpot", "0.1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    results = json.loads(out[-1])["results"]
    assert {(r["num_instances"], r["policy"]) for r in results} == {
        (n, p) for n in (2, 3) for p in POLICIES
    }
    assert all(r["num_requests"] == 30 and r["slo_attainment"] == 1.0 for r in results)
    assert any(r["prefix_hit_rate"] > 0 for r in results)  # block 0 is shared by all
    assert out[1].startswith("| instances | policy |")


def test_xllm_sim_sweep_writes_a_table_json_and_plot_per_load_count_and_arm(tmp_path, capsys):
    import json

    from xllm.cli import main

    rows = [{"timestamp": 100 * i, "input_length": 700, "output_length": 4} for i in range(20)]
    trace = tmp_path / "mini_trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results" / "sweep"
    argv = ["sim", "sweep", "--trace", str(trace), "--instances", "2,3", "--profile", "a100"]
    argv += ["--slo-ttft", "1", "--slo-tpot", "0.1", "--time-scales", "1,0.0001"]
    assert main([*argv, "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())["rows"]
    arms = ("colocated", "disaggregated", "slo-pd")
    assert [(r["time_scale"], r["num_instances"], r["arm"]) for r in data] == [
        (s, n, a) for s in (1.0, 0.0001) for n in (2, 3) for a in arms
    ]
    roles = {(r["num_instances"], r["arm"]): r["final_roles"] for r in data if r["time_scale"] == 1}
    assert roles[(2, "colocated")] == "2 both" and roles[(3, "disaggregated")] == "2P:1D"
    light = {(r["num_instances"], r["arm"]): r for r in data if r["time_scale"] == 1.0}
    assert all(r["slo_attainment"] == 1.0 for r in light.values())  # 100 s apart
    for r in data[6:]:  # all 20 at once: they queue
        assert r["ttft_p99"] > 2 * light[(r["num_instances"], r["arm"])]["ttft_p99"]
        assert r["offered_rps"] > 1000 * light[(r["num_instances"], r["arm"])]["offered_rps"]
    assert out.with_suffix(".png").stat().st_size > 10_000
    table = out.with_suffix(".md").read_text()
    assert "| time scale | offered req/s | instances | arm |" in table
    assert capsys.readouterr().out.count("| 0.0001 |") == 6
