"""The EPD simulator on one machine: processes sharing fewer cores stretch each other's steps,
a request's trips between processes (NATS messages, Mooncake transfers) cost what the
profiler measured, and so the topology chosen flips for those reasons: colocated when the
trips are dear and the tower cheap, disaggregated when the tower is dear and cores many."""

from __future__ import annotations

import pytest

from services.scheduler.cost_model import StepShape, load_model_config, step_time
from services.scheduler.policies import get_policy
from services.scheduler.sim.epd_cpu import CpuShare
from services.scheduler.sim.epd_profile import EncodeCost, HopCost
from services.scheduler.sim.epd_sim import EpdSimulator, ImageSimRequest
from services.scheduler.sim.simulator import ClusterSpec
from tests.sim.epd_choices import HW, IMAGE, SPEC, chosen_kind

MODEL = load_model_config("qwen3-0.6b")
PROMPT = IMAGE + 12
ENCODE = EncodeCost(((IMAGE, 0.020),), call_overhead=0.001, bytes_per_token=4096)
HOPS = HopCost(nats_rtt=0.010, transfer_latency=0.002, transfer_bw=1e9)


def image_req(i, arrival=0.0, output=4):
    return ImageSimRequest(f"r{i}", arrival, PROMPT, output, image_tokens=IMAGE, image_id=i)


def run(requests, roles, encoders=0, hops=None, cores=0):
    sim = EpdSimulator(
        MODEL, HW, ClusterSpec(tuple(roles), SPEC), get_policy("round-robin"),
        encode=ENCODE, num_encoders=encoders, hops=hops, cores=cores,
    )  # fmt: skip
    return sim.run(requests), sim


def first_step_seconds():
    """A colocated image request's first step: its prefill and the tower on its image."""
    shape = StepShape(prefill_chunks=((PROMPT, 0),), num_prefill_samples=1)
    return step_time(MODEL, shape, HW) + ENCODE.batch_seconds([IMAGE])


def test_cpu_share_runs_each_busy_job_at_cores_over_busy_speed():
    cpu = CpuShare(cores=1)
    cpu.start(0.0, 1.0, "a")
    assert cpu.next_end() == pytest.approx(1.0)  # alone: its own speed
    cpu.start(0.5, 1.0, "b")  # a has 0.5 s of work left, now at half speed
    assert cpu.next_end() == pytest.approx(1.5)
    assert cpu.take_done(1.5) == ["a"]
    assert cpu.next_end() == pytest.approx(2.0)  # b: 0.5 s done while shared, 0.5 s alone
    assert cpu.take_done(2.0) == ["b"] and cpu.next_end() is None


@pytest.mark.parametrize("cores", [0, 3, 8])
def test_no_stretch_with_a_core_for_every_process(cores):
    reqs = [image_req(i) for i in range(3)]
    done, _ = run(reqs, ["both"] * 3, cores=cores)
    assert [r.first_token_at for r in done] == pytest.approx([first_step_seconds()] * 3)


def test_oversubscribed_steps_stretch_by_busy_processes_over_cores():
    # three instances each start the same first step at t = 0, on 2 cores: 1.5x as long
    done, _ = run([image_req(i) for i in range(3)], ["both"] * 3, cores=2)
    assert {r.instance_id for r in done} == {"inst-000", "inst-001", "inst-002"}
    assert [r.first_token_at for r in done] == pytest.approx([1.5 * first_step_seconds()] * 3)
    alone, _ = run([image_req(i) for i in range(3)], ["both"] * 3)
    for shared, own in zip(done, alone, strict=True):  # every later step stretched too
        assert shared.finished_at > 1.4 * own.finished_at


def test_encoders_share_the_cores_and_no_more_work_is_done_than_the_cores_allow():
    reqs = [image_req(i, arrival=0.01 * i) for i in range(12)]
    shared, sim = run(reqs, ["both"], encoders=2, cores=1)
    work = sum(i.busy_time for i in sim.instances) + sum(e.busy_time for e in sim.encoders)
    end = max(r.finished_at for r in shared)
    assert end >= work - 1e-9  # one core: the work of all three processes, one after another
    own, _ = run([image_req(i, arrival=0.01 * i) for i in range(12)], ["both"], encoders=2)
    assert end > max(r.finished_at for r in own) + 0.02


def test_a_request_pays_its_messages_and_its_transfers_at_the_measured_costs():
    (plain,), _ = run([image_req(0)], ["both"])
    (hopped,), _ = run([image_req(0)], ["both"], hops=HOPS)
    # colocated: submit, the instance's command, the first token back
    assert hopped.first_token_at - plain.first_token_at == pytest.approx(3 * 0.005)
    (enc,), _ = run([image_req(0)], ["both"], encoders=1, hops=HOPS)
    prefill = step_time(MODEL, StepShape(prefill_chunks=((PROMPT, 0),), num_prefill_samples=1), HW)
    read = 0.002 + IMAGE * ENCODE.bytes_per_token / 1e9
    # + the encoder's request and reply, the embeddings read at the measured bandwidth
    want = 5 * 0.005 + ENCODE.batch_seconds([IMAGE]) + read + prefill
    assert enc.first_token_at == pytest.approx(want)
    (pd,), _ = run([image_req(0, output=2)], ["prefill", "decode"], hops=HOPS)
    (pd_plain,), _ = run([image_req(0, output=2)], ["prefill", "decode"])
    kv = 0.002 + PROMPT * MODEL.kv_bytes_per_token / 1e9 + 0.005  # the write, its notice
    plain_kv = HW.transfer_latency + PROMPT * MODEL.kv_bytes_per_token / HW.interconnect_bw
    assert pd.first_token_at - pd_plain.first_token_at == pytest.approx(4 * 0.005)
    gap = (pd.finished_at - pd.first_token_at) - (pd_plain.finished_at - pd_plain.first_token_at)
    assert gap == pytest.approx(kv - plain_kv)


def test_dear_trips_and_a_cheap_tower_make_colocated_win():
    cheap = 0.005  # s per image
    assert chosen_kind(cheap, HopCost(), cores=0) != "EPD"  # free trips: an encoder pays off
    dear = HopCost(nats_rtt=0.020, transfer_latency=0.0004, transfer_bw=0.8e9)
    assert chosen_kind(cheap, dear, cores=2) == "EPD"  # each extra message costs more than it saves
    assert chosen_kind(cheap, dear, cores=0) == "EPD"  # the trips alone do it


def test_a_dear_tower_and_many_cores_make_a_disaggregated_topology_win():
    measured = HopCost(nats_rtt=0.0005, transfer_latency=0.0004, transfer_bw=0.8e9)
    assert chosen_kind(0.030, measured, cores=8) in ("E+PD", "E+P+D", "EP+D", "ED+P")
    assert chosen_kind(0.005, HopCost(nats_rtt=0.020), cores=8) == "EPD"  # not with a cheap tower
