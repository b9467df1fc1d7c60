"""The EPD profiler on the real engine (tiny Qwen2-VL): a measured step really runs the
vision tower on the images it was given, beside the decode batch and the prefill, and
leaves the engine empty; `xllm sim profile-epd` from a saved profile prints a choice among
the kinds asked for, with the flags that deploy it."""

from __future__ import annotations

import json

import pytest

from services.scheduler.sim.epd_measure import EpdBench
from services.scheduler.sim.epd_profile import EncodeCost, EpdProfile


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2-vl"))


def test_a_measured_step_encodes_every_image_beside_the_decodes_and_the_prefill(model_dir):
    bench = EpdBench(model_dir, "float32", max_batch=12, max_ctx=256)
    model = bench.engine.runner.model
    calls: list[int] = []
    encode = model.encode_images

    def counting(pixels, grids):
        calls.append(len(grids))
        return encode(pixels, grids)

    model.encode_images = counting
    scheduled = []
    schedule = bench.engine.scheduler.schedule

    def recording(*a, **kw):
        out = schedule(*a, **kw)
        scheduled.append(sorted(item.num_new_tokens for item in out.scheduled))
        return out

    bench.engine.scheduler.schedule = recording
    image = bench.image(120, 160)
    measure = bench.step_seconds(decodes=4, ctx=64, image=image, repeats=2)
    assert measure(3, 32) > 0
    assert calls == [3, 3]  # one tower call per step, on the three images
    assert scheduled == [[1, 1, 1, 1, 2, 2, 2, 32]] * 2  # 4 decodes, 3 image chunks, prefill
    assert not bench.engine.sequences and not bench.engine.scheduler.has_unfinished()
    seconds, per_token = bench.tower_seconds([image, image], repeats=1)
    assert seconds > 0 and per_token == model.config.hidden_size * 4  # float32 rows
    assert bench.decode_seconds(120, 160, repeats=1) > 0


def test_profile_epd_cli_from_a_saved_profile(model_dir, tmp_path, capsys):
    from xllm.cli import main
    from xllm.hardware import SPEC_PROFILES

    hw_path = tmp_path / "hw.json"
    SPEC_PROFILES["a100"].save(hw_path)
    profile = EpdProfile(
        model="tiny", tpot_slo=0.05, decode_batch=8, decode_ctx=64, decode_step=0.01,
        image_tokens=24, max_encode_batch=4, max_encode_tokens=96, max_prefill_tokens=512,
        encode=EncodeCost(((6, 0.001), (54, 0.01)), 0.001, 512),
        hardware_profile=str(hw_path),
    )  # fmt: skip
    profile.save(tmp_path / "p.json")
    argv = ["sim", "profile-epd", "--model", model_dir, "--profile", str(tmp_path / "p.json"),
            "--instances", "3", "--requests", "16", "--kinds", "EPD,E+PD,E+P+D"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    labels = [c["topology"] for c in result["candidates"]]
    assert labels == ["EPD 3PD", "E+PD 1E:2PD", "E+PD 2E:1PD", "E+P+D 1E:1P:1D"]
    assert result["choice"] in labels and result["kind"] in ("EPD", "E+PD", "E+P+D")
    chosen = next(c for c in result["candidates"] if c["topology"] == result["choice"])
    assert chosen["goodput_rps"] == max(c["goodput_rps"] for c in result["candidates"])
    assert result["cluster_options"] == chosen["cluster_options"]
    assert result["engine_flags"]["max_encode_batch"] == 4
    assert any("chosen" in line for line in out)


def test_measure_hops_times_a_nats_round_trip_and_mooncake_reads(nats_url):
    from services.scheduler.sim.epd_hops import measure_hops, mooncake_reads

    reads = mooncake_reads([1 << 16, 1 << 22], repeats=2)
    assert [n for n, _ in reads] == [1 << 16, 1 << 22]
    assert all(seconds > 0 for _, seconds in reads)
    hops = measure_hops(1 << 16, nats_url)
    assert 0 < hops.nats_rtt < 1.0  # a real round trip through the server
    assert hops.transfer_bw > 0 and hops.transfer_latency >= 0
