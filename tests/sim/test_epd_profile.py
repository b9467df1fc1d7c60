"""The EPD profiler's pure parts: the budget searches over a synthetic step cost, the encode
cost fitted from tower timings, the profile's JSON round trip, and the strategy choice."""

from __future__ import annotations

import json
import math

import pytest

from services.scheduler.sim.epd_choice import Topology, candidates, choose
from services.scheduler.sim.epd_profile import (
    EncodeCost,
    EpdProfile,
    HopCost,
    fit_encode_cost,
    fit_transfer,
    max_under,
    search_budgets,
)
from services.scheduler.sim.report import SimReport


@pytest.mark.parametrize("limit", [0.5, 1.0, 7.3, 40.0, 99.9, 1e9])
def test_max_under_finds_the_largest_value_within_the_limit_and_measures_few(limit):
    calls = []

    def measure(x):
        calls.append(x)
        return 0.4 * x + 0.1

    got = max_under(measure, 1, 100, limit)
    want = max([x for x in range(1, 101) if 0.4 * x + 0.1 <= limit], default=0)
    assert got == want
    assert len(calls) <= 2 * math.ceil(math.log2(100)) + 2


def test_search_budgets_on_a_synthetic_step_cost():
    # a step: 20 ms of decodes, 3 ms per image, 0.05 ms per prefill token; SLO 50 ms
    def step(images, tokens):
        return 0.020 + 0.003 * images + 0.00005 * tokens

    images, tokens = search_budgets(step, 0.050, max_images=64, max_tokens=4096)
    assert images == 10  # 20 + 30 = 50 ms; 11 images would be 53
    assert tokens == 600
    # an SLO the decode batch alone misses: nothing fits
    assert search_budgets(step, 0.019, 64, 4096) == (0, 0)


def test_encode_cost_is_linear_between_sizes_and_one_overhead_per_call():
    cost = EncodeCost(((10, 0.001), (50, 0.005)), call_overhead=0.002, bytes_per_token=512)
    assert cost.image_seconds(30) == pytest.approx(0.003)
    assert cost.image_seconds(90) == pytest.approx(0.009)  # beyond: the last slope
    assert cost.batch_seconds([10, 50]) == pytest.approx(0.008)
    assert cost.batch_seconds([]) == 0.0
    assert cost.embedding_bytes(30) == 30 * 512
    decoding = EncodeCost(cost.points, 0.002, 512, decode_points=((10, 0.0005), (50, 0.0025)))
    assert decoding.image_seconds(30) == pytest.approx(0.003 + 0.0015)  # tower + its file
    assert decoding.batch_seconds([10, 50]) == pytest.approx(0.008 + 0.003)


def test_fit_encode_cost_separates_the_call_overhead_from_per_image_time():
    truth = EncodeCost(((6, 0.0003), (24, 0.0009), (54, 0.0021)), call_overhead=0.0007)
    samples = [(b, t, truth.batch_seconds([t] * b)) for t, _ in truth.points for b in (1, 4)]
    fitted = fit_encode_cost(samples, bytes_per_token=512)
    assert fitted.call_overhead == pytest.approx(0.0007)
    for (t, s), (t2, s2) in zip(fitted.points, truth.points, strict=True):
        assert t == t2 and s == pytest.approx(s2)


def test_profile_json_round_trip(tmp_path):
    profile = EpdProfile(
        model="m", tpot_slo=0.05, decode_batch=8, decode_ctx=128, decode_step=0.01,
        image_tokens=24, max_encode_batch=5, max_encode_tokens=120, max_prefill_tokens=900,
        encode=EncodeCost(((24, 0.001),), 0.0005, 512, ((24, 0.0004),)),
        step_points=[{"images": 1}], hops=HopCost(nats_rtt=4e-4, transfer_latency=3e-4, transfer_bw=8e8), cores=2,
    )  # fmt: skip
    profile.save(tmp_path / "p.json")
    assert EpdProfile.load(tmp_path / "p.json") == profile
    # a profile saved before the trips and cores were measured: none of either
    old = json.loads((tmp_path / "p.json").read_text())
    del old["hops"], old["cores"], old["encode"]["decode_points"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = EpdProfile.load(tmp_path / "old.json")
    assert loaded.hops == HopCost() and loaded.cores == 0 and loaded.encode.decode_points == ()


def test_fit_transfer_and_the_hop_costs():
    latency, bw = fit_transfer(
        [(1 << 20, 0.0003 + (1 << 20) / 2e9), (1 << 16, 0.0003 + 2**16 / 2e9)]
    )
    assert latency == pytest.approx(0.0003) and bw == pytest.approx(2e9)
    # noise: the larger read measured no slower; its average rate, never an infinite one
    assert fit_transfer([(1 << 16, 0.0004), (1 << 20, 0.0003)]) == (0.0004, (1 << 20) / 0.0003)
    hops = HopCost(nats_rtt=0.002, transfer_latency=latency, transfer_bw=bw)
    assert hops.message == pytest.approx(0.001)
    assert hops.transfer_seconds(2_000_000) == pytest.approx(0.0003 + 0.001)
    assert HopCost().transfer_seconds(2_000_000) == 0.0  # not measured
    assert hops.dispatch_messages(encoder=False, disaggregated=False) == 3
    assert hops.dispatch_messages(encoder=True, disaggregated=True) == 6


def test_candidates_cover_every_kind_and_split():
    tops = candidates(4)
    kinds = [t.kind for t in tops]
    assert kinds.count("EPD") == 1
    assert kinds.count("E+PD") == kinds.count("EP+D") == kinds.count("ED+P") == 3
    assert kinds.count("E+P+D") == 3  # 1:1:2, 1:2:1, 2:1:1
    for t in tops:
        assert t.encode + len(t.roles) == 4
    assert Topology("E+P+D", 1, 2, 1).cluster_options() == {"encode": 1, "prefill": 2, "decode": 1}
    assert Topology("E+PD", encode=1, both=3).cluster_options() == {"encode": 1, "instances": 3}
    assert Topology("ED+P", prefill=1, decode=3).cluster_options()["encode_on"] == "decode"
    assert candidates(3, ("EPD", "E+PD")) == [
        Topology("EPD", both=3), Topology("E+PD", encode=1, both=2),
        Topology("E+PD", encode=2, both=1),
    ]  # fmt: skip


def report(name, goodput, attainment=1.0, ttft_p99=0.1):
    return SimReport(
        policy=name, num_instances=2, num_requests=10, num_rejected=0,
        slo_attainment=attainment, goodput_rps=goodput, throughput_rps=goodput, wall_s=1.0,
        ttft_p50=0.05, ttft_p90=0.08, ttft_p99=ttft_p99, tpot_p50=0.01, tpot_p90=0.01,
        tpot_p99=0.02, util_mean=0.5, util_min=0.5, util_max=0.5, prefix_hit_rate=0.0,
        role_flips=0, final_roles="2 both", utilisation={},
    )  # fmt: skip


def test_choose_takes_the_highest_goodput_then_attainment_then_ttft_then_the_simpler():
    reports = [report("EPD 2PD", 3.0), report("E+PD 1E:1PD", 4.0), report("EP+D 1P:1D", 3.5)]
    best, reasons = choose(reports, ["EPD", "E+PD", "EP+D"])
    assert best == 1 and "chosen" in reasons[1] and "less goodput" in reasons[0]
    tie = [report("E+PD", 3.0, ttft_p99=0.2), report("EP+D", 3.0, ttft_p99=0.1)]
    assert choose(tie, ["E+PD", "EP+D"])[0] == 1
    simpler = [report("E+PD", 3.0), report("EPD", 3.0)]
    assert choose(simpler, ["E+PD", "EPD"])[0] == 1


def test_the_cli_spells_out_every_kind():
    from services.scheduler.sim import epd_choice, epd_tool

    assert tuple(epd_tool.KINDS.split(",")) == epd_choice.KINDS
