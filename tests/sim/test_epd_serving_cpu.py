"""The serving path's CPU outside the steps: measured from /proc around live bursts, charged
by the EPD simulator on the shared cores where it happens, so that a request crossing more
processes costs more, and the topology chosen flips for that reason."""

from __future__ import annotations

import os
import threading
import time

import pytest

from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import get_policy
from services.scheduler.sim.epd_profile import EncodeCost, EpdProfile, HopCost, ServingCpu
from services.scheduler.sim.epd_serving_cpu import (
    Sample,
    cpu_and_loop_seconds,
    fit_serving_cpu,
    proc_cpu_seconds,
    process_kind,
    stat_cpu_seconds,
)
from services.scheduler.sim.epd_sim import EpdSimulator, ImageSimRequest
from services.scheduler.sim.simulator import ClusterSpec
from tests.sim.epd_choices import HW, IMAGE, SPEC, chosen_kind, profile_of

# the machine and request of test_epd_machine.py
MODEL = load_model_config("qwen3-0.6b")
ENCODE = EncodeCost(((IMAGE, 0.020),), call_overhead=0.001, bytes_per_token=4096)
HOPS = HopCost(nats_rtt=0.010, transfer_latency=0.002, transfer_bw=1e9)


def image_req(i, output=4):
    return ImageSimRequest(f"r{i}", 0.0, IMAGE + 12, output, image_tokens=IMAGE, image_id=i)


def run(requests, roles, hops=HOPS, cores=1):
    return run_cpu(requests, roles, None, cores)


def test_stat_parsing_skips_a_name_with_spaces_and_parentheses():
    rest = " ".join(["S"] + ["0"] * 10 + ["250", "50"] + ["0"] * 30)
    assert stat_cpu_seconds(f"42 (py (x) y) {rest}", ticks=100) == pytest.approx(3.0)


def test_proc_cpu_of_this_process_is_what_the_kernel_says_it_burnt():
    def kernel() -> float:
        t = os.times()  # this process's user + system CPU, by the kernel (all threads)
        return t.user + t.system

    before, mine, wall = kernel(), proc_cpu_seconds(os.getpid()), time.perf_counter()
    while kernel() - before < 0.2 and time.perf_counter() - wall < 20:
        pass  # busy: CPU, not sleep (on a loaded machine it takes longer)
    burnt, grown = kernel() - before, proc_cpu_seconds(os.getpid()) - mine
    assert burnt >= 0.2
    assert grown == pytest.approx(burnt, abs=0.03)  # a few clock ticks


def burn(seconds: float) -> None:
    """Spin until this thread has run `seconds` on a CPU (longer on a loaded machine)."""
    start, wall = time.thread_time(), time.perf_counter()
    while time.thread_time() - start < seconds and time.perf_counter() - wall < 20:
        pass


def test_the_main_threads_cpu_is_told_apart_from_another_threads():
    pid = os.getpid()
    total0, main0 = cpu_and_loop_seconds(pid)
    worker = threading.Thread(target=burn, args=(0.2,))
    worker.start()
    worker.join()  # a step on the engine's thread: all threads grow, not the main one
    total1, main1 = cpu_and_loop_seconds(pid)
    assert total1 - total0 >= 0.15 and main1 - main0 < 0.05  # /proc/<pid>/stat counts 10 ms ticks
    burn(0.2)  # the loop's own work
    total2, main2 = cpu_and_loop_seconds(pid)
    assert main2 - main1 == pytest.approx(0.2, abs=0.03)
    assert total2 - total1 == pytest.approx(main2 - main1, abs=0.03)


def test_outside_the_steps_is_the_larger_lower_bound():
    before = Sample(0.0, {"instance": 1.0, "instance loop": 0.5, "front": 2.0}, 10.0, 0.0)
    # busy machine: steps' wall (0.8 s) over their CPU; the main thread's 0.1 s is the bound
    after = Sample(1.0, {"instance": 1.6, "instance loop": 0.6, "front": 2.3}, 10.8, 0.0)
    assert after.minus(before) == pytest.approx({"instance": 0.1, "front": 0.3})
    # quiet machine: the steps' wall is their CPU, the rest (0.3 s) beats the main thread's
    quiet = Sample(1.0, {"instance": 2.0, "instance loop": 0.6, "front": 2.3}, 10.7, 0.0)
    assert quiet.minus(before)["instance"] == pytest.approx(0.3)


def test_process_kinds_of_a_cluster():
    kinds = [
        process_kind(n)
        for n in (
            "inst-0",
            "prefill-1",
            "decode-0",
            "encode-0",
            "nats-server",
            "gateway",
            "scheduler",
        )
    ]
    assert kinds == ["instance", "instance", "instance", "encoder", "nats", "front", "front"]


def samples(at, per_kind_extra, steps=0.0, tower=0.0):
    return Sample(at, dict(per_kind_extra), steps, tower)


def test_fit_recovers_per_request_and_per_token_cpu_after_idle_and_steps():
    idle_rate = {"front": 0.01, "nats": 0.002, "instance": 0.03, "client": 0.0}
    truth = {
        "front": (0.004, 0.0003),
        "nats": (0.0009, 0.0001),
        "instance": (0.002, 0.0008),
        "client": (0.001, 0.0002),
    }
    n, tokens = 8, (2, 16)

    def burst(t0, length, out_tokens, step_seconds):
        cpu0 = {k: 100.0 for k in truth}
        cpu1 = {
            k: 100.0 + idle_rate[k] * length + n * (r + out_tokens * t)
            for k, (r, t) in truth.items()
        }
        cpu1["instance"] += step_seconds  # the steps' own time, reported by the instances
        return Sample(t0, cpu0, 5.0, 0.0), Sample(t0 + length, cpu1, 5.0 + step_seconds, 0.0)

    idle = (Sample(0.0, {k: 100.0 for k in truth}, 5.0, 0.0),
            Sample(2.0, {k: 100.0 + 2 * v for k, v in idle_rate.items()}, 5.0, 0.0))  # fmt: skip
    cpu = fit_serving_cpu(idle, burst(3.0, 1.5, 2, 0.4), burst(6.0, 3.0, 16, 1.9), n, tokens)
    assert cpu.front_request == pytest.approx(0.004 + 0.001)  # the client counts with the front
    assert cpu.front_token == pytest.approx(0.0003 + 0.0002)
    assert cpu.nats_message == pytest.approx(0.0009 / 3)  # a colocated request's 3 messages
    assert cpu.nats_token == pytest.approx(0.0001)
    assert cpu.instance_request == pytest.approx(0.002)
    assert cpu.instance_token == pytest.approx(0.0008)
    assert cpu.encoder_request == pytest.approx(0.002)  # no encoder measured: an instance's
    assert cpu.idle == pytest.approx(sum(idle_rate.values()))


SERVING = ServingCpu(front_request=0.004, nats_message=0.001, instance_request=0.003)


def test_a_request_pays_the_cpu_of_every_process_it_crosses_before_its_first_token():
    (plain,), _ = run([image_req(0)], ["both"], hops=HOPS, cores=1)
    (charged,), _ = run_cpu([image_req(0)], ["both"], SERVING)
    # front, 3 messages through nats-server, the instance's loop: on the one core, in turn
    assert charged.first_token_at - plain.first_token_at == pytest.approx(0.004 + 3 * 0.001 + 0.003)
    (pd_plain,), _ = run([image_req(0, output=2)], ["prefill", "decode"], hops=HOPS, cores=1)
    (pd,), _ = run_cpu([image_req(0, output=2)], ["prefill", "decode"], SERVING)
    assert pd.first_token_at - pd_plain.first_token_at == pytest.approx(0.004 + 4 * 0.001 + 0.003)
    handoff = (pd.finished_at - pd.first_token_at) - (
        pd_plain.finished_at - pd_plain.first_token_at
    )
    assert handoff == pytest.approx(0.003 + 0.001)  # the decode side's loop, the notice


def run_cpu(requests, roles, serving, cores=1):
    sim = EpdSimulator(
        MODEL, HW, ClusterSpec(tuple(roles), SPEC), get_policy("round-robin"),
        encode=ENCODE, hops=HOPS, cores=cores, serving_cpu=serving,
    )  # fmt: skip
    return sim.run(requests), sim


def test_cpu_per_token_lengthens_the_decode_steps_on_the_shared_cores():
    (plain,), _ = run([image_req(0, output=9)], ["both"], hops=HOPS, cores=1)
    (charged,), _ = run_cpu(
        [image_req(0, output=9)], ["both"], ServingCpu(instance_token=0.002, front_token=0.001)
    )
    # 8 decode tokens after the first: each step + the instance's loop, the front's beside it
    # on the one core (processor sharing: both run at half speed while the front's job lasts)
    decoding = (charged.finished_at - charged.first_token_at) - (
        plain.finished_at - plain.first_token_at
    )
    assert decoding == pytest.approx(8 * (0.002 + 0.001), rel=0.05)


def choice(serving: ServingCpu) -> str:
    """On 2 cores, the tower dear enough that an encoder pays off on its own and the trips
    sub-millisecond (what the profiler measured on the 2-core machine)."""
    hops = HopCost(nats_rtt=0.0005, transfer_latency=0.0004, transfer_bw=0.8e9)
    return chosen_kind(0.030, hops, cores=2, serving_cpu=serving)


def test_the_cpu_of_crossing_processes_makes_colocated_win_and_none_does_not():
    assert choice(ServingCpu()) != "EPD"  # no serving CPU: the encoder's tower pays off
    front = dict(
        front_request=0.005,
        front_token=0.0005,
        nats_message=0.0002,
        nats_token=0.0001,
        instance_token=0.001,
    )
    # the front's and the per-token CPU alone, the same for every topology: not colocated
    assert choice(ServingCpu(**front)) != "EPD"
    # dear per process crossed (vs a 30 ms tower): each extra hop costs more than it saves
    assert choice(ServingCpu(**front, instance_request=0.020, encoder_request=0.020)) == "EPD"


def test_old_profiles_load_without_serving_cpu_and_new_ones_keep_it(tmp_path):
    profile = profile_of(0.030, serving_cpu=SERVING)
    profile.save(tmp_path / "p.epd.json")
    assert EpdProfile.load(tmp_path / "p.epd.json") == profile
    old = profile.as_dict()
    del old["serving_cpu"]
    loaded = EpdProfile.from_dict(old)
    assert loaded.serving_cpu == ServingCpu() and not loaded.serving_cpu.measured
