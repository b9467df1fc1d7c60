"""`xllm bench serve` against a live cluster of ours (real processes, tiny model, no mocks).

Every request must come back with exactly the output length asked for, and the goodput the
summary reports must equal the one recomputed here from the per-request records it wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import Slo, summarize
from xllm.cli.bench.runner import LoadConfig, run_load
from xllm.cli.bench.workloads import LengthRange, PromptMaker, random_workload, trace_workload
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.cli.commands.bench import first_model

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Loose enough that a loaded 2-core machine still meets it for some requests (the goodput
# must be > 0 for the recomputation check to compare something).
SLO_TTFT_MS, SLO_TPOT_MS = 3000.0, 300.0


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


@pytest.fixture(scope="module")
def base_url(model_dir, tmp_path_factory):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        log_dir=str(tmp_path_factory.mktemp("logs")),
        log_level="WARNING",
        ready_timeout=180,
        stop_grace=5,
    )
    engine_args = ["--num-kv-blocks", "512", "--max-model-len", "2048"]
    # NOTE: torch fallbacks instead of the native kernels: the kernels' build is cached per
    # source path, so worktrees sharing a machine rebuild it (~70 s of a loaded 2-core box).
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XLLM_NATIVE_KERNELS", "0")
        cluster = serving_cluster(config, engine_args)
        cluster.start()
    try:
        cluster.wait_ready(config.ready_timeout)
        yield config.base_url
    finally:
        cluster.stop()


def recomputed_goodput(result: dict) -> float:
    """Goodput from the written records alone, by the definition in `xllm.cli.bench.report`."""
    slo = result["summary"]["slo"]
    good = 0
    for r in result["records"]:
        ttft_ok = r["ttft"] is not None and r["ttft"] * 1e3 <= slo["ttft_ms"]
        tpot_ok = r["tpot"] is None or r["tpot"] * 1e3 <= slo["tpot_ms"]
        good += r["error"] is None and ttft_ok and tpot_ok
    return good / result["summary"]["duration_s"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_every_request_gets_exactly_its_output_length(base_url, model_dir, chat):
    maker = PromptMaker(model_dir if chat else None, chat=chat, seed=1)
    requests = random_workload(12, LengthRange(16, 200), LengthRange(1, 40), maker, seed=1)
    client = ClientConfig(base_url, first_model(base_url), chat=chat)
    run = run_load(requests, client, LoadConfig(concurrency=4, progress=False))
    summary = summarize(run.records, run.duration, Slo(SLO_TTFT_MS, SLO_TPOT_MS))
    assert summary.failures == {}
    assert [r.output_tokens for r in run.records] == [r.output_len for r in requests]
    assert all(r.counted_by == "usage" for r in run.records)
    if not chat:  # token-id prompts: the server counted exactly what we made
        assert [r.prompt_tokens for r in run.records] == [r.input_len for r in requests]
    assert summary.output_tokens == sum(r.output_len for r in requests)
    assert 0 < summary.goodput <= summary.request_throughput


def test_mooncake_prefixes_hit_the_servers_prefix_cache(base_url):
    """Requests sharing leading hash ids share prompt prefixes, which the server then finds
    in its prefix cache (block 0 is 32 tokens at this scale: two 16-token KV blocks)."""
    maker = PromptMaker(None, chat=False)
    requests = trace_workload("mooncake", maker, limit=6, length_scale=1 / 16)
    assert requests[0].prompt[:32] == requests[1].prompt[:32]  # both start with block 0
    assert requests[0].prompt[32:64] != requests[1].prompt[32:64]  # then differ
    client = ClientConfig(base_url, first_model(base_url))
    run = run_load(requests, client, LoadConfig(concurrency=1, progress=False, warmup=0))
    assert [r.error for r in run.records] == [None] * 6
    assert all(r.cached_tokens >= 32 for r in run.records[1:])


def test_cli_writes_a_goodput_matching_its_records(base_url, tmp_path):
    result_json = tmp_path / "result.json"
    argv = [
        sys.executable, "-m", "xllm.cli", "bench", "serve", "--base-url", base_url,
        "--workload", "random", "--num-requests", "12", "--input-len", "16:200",
        "--output-len", "1:40", "--concurrency", "4", "--no-progress",
        "--slo-ttft", str(SLO_TTFT_MS), "--slo-tpot", str(SLO_TPOT_MS),
        "--result-json", str(result_json), "--plot", str(tmp_path / "plots"),
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO)])}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    result = json.loads(result_json.read_text())
    assert printed == result["summary"]
    assert result["summary"]["failed"] == 0
    assert [r["output_tokens"] for r in result["records"]] == [
        r["output_len"] for r in result["records"]
    ]
    assert result["summary"]["goodput"] == pytest.approx(recomputed_goodput(result))
    for name in ("latency_cdf", "throughput", "queue"):
        assert (tmp_path / "plots" / f"{name}.png").stat().st_size > 1000


def test_cli_takes_vllm_bench_serve_flag_names(base_url, tmp_path):
    """What a `vllm bench serve` user types runs, and means the same as our names."""
    argv = [
        sys.executable, "-m", "xllm.cli", "bench", "serve", "--base-url", base_url,
        "--dataset-name", "random", "--num-prompts", "16", "--max-concurrency", "4",
        "--random-input-len", "32", "--random-output-len", "8", "--no-progress",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", "vllm.json",
    ]  # fmt: skip
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO)])}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "vllm.json").read_text())
    assert result["summary"]["completed"] == 16 and result["summary"]["failed"] == 0
    assert result["config"]["concurrency"] == 4
    assert {(r["input_len"], r["output_tokens"]) for r in result["records"]} == {(32, 8)}
