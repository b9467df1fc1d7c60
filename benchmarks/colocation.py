"""Online/offline co-location, live: online traffic with and without an offline backlog.

Online traffic is a slice of the Azure code trace (by default 10 s from minute 3, lengths
x 1/4, arrivals replayed `--time-scale` x slower), sent by `xllm.cli.bench` (open loop,
streaming, exact output lengths). The offline backlog is ShareGPT prompts, more than the
window can finish. Four runs, each on a fresh `xllm up`-shaped cluster (one colocated
instance of the tiny demo model, bf16):

  * online:  the trace alone;
  * offline: the backlog alone for as long as the online run took: the capacity C;
  * xllm:    trace + backlog as offline jobs on NATS (priority 1, `--offline-concurrency`
             at a time), as this project runs them;
  * naive:   trace + backlog as ordinary HTTP requests (priority 0), as many at once.

Idle capacity = C x (1 - the online run's busy fraction), the busy fraction from the
instance's heartbeats (`busy_seconds` over the run). Offline throughput counts the output
tokens of jobs finished within the online window. Targets: online SLO attainment with the
backlog >= 0.95 x alone; offline tokens/s >= 0.5 x idle capacity.

    .venv/bin/python benchmarks/colocation.py [--time-scale 6 --offline-concurrency 8]

Prints one JSON line (figures per run and the two ratios); tables go to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import nats
from common import emit

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import Slo, format_table, summarize
from xllm.cli.bench.runner import LoadConfig, run_load
from xllm.cli.bench.workloads import LengthRange, PromptMaker, sharegpt_workload, trace_workload
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.protocol import subjects

_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def busy_seconds(config: ClusterConfig) -> float:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with _NO_PROXY.open(url, timeout=10) as response:
        return sum(i["steps"]["busy_seconds"] for i in json.load(response)["instances"])


class HttpBacklog(threading.Thread):
    """The naive baseline: the backlog as ordinary requests, `concurrency` at a time."""

    def __init__(self, config: ClusterConfig, model: str, backlog, concurrency: int):
        super().__init__(daemon=True)
        self.url, self.model, self.backlog = config.base_url + "/completions", model, backlog
        self.concurrency = concurrency
        self.stop = threading.Event()
        self.done: list[tuple[float, int]] = []  # (end time, output tokens)

    def run(self) -> None:
        queue = list(self.backlog)
        lock = threading.Lock()

        def worker() -> None:
            while not self.stop.is_set():
                with lock:
                    if not queue:
                        return
                    request = queue.pop()
                body = {
                    "model": self.model, "prompt": request.prompt,
                    "max_tokens": request.output_len, "min_tokens": request.output_len,
                    "ignore_eos": True,
                }  # fmt: skip
                http = urllib.request.Request(
                    self.url, json.dumps(body).encode(), {"Content-Type": "application/json"}
                )
                try:
                    with _NO_PROXY.open(http, timeout=600) as response:
                        tokens = json.load(response)["usage"]["completion_tokens"]
                    self.done.append((time.monotonic(), tokens))
                except (urllib.error.URLError, OSError):
                    pass

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(self.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


async def publish_backlog(nats_url: str, backlog) -> None:
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for i, request in enumerate(backlog):
        job = {
            "endpoint": "/v1/completions", "prompt": request.prompt,
            "max_tokens": request.output_len, "min_tokens": request.output_len,
            "ignore_eos": True,
        }  # fmt: skip
        await js.publish(
            subjects.OFFLINE_SUBMIT, json.dumps(job).encode(), headers={"Nats-Msg-Id": f"b{i}"}
        )
    await nc.close()


async def nats_tokens_done(nats_url: str) -> int:
    """Output tokens of every stored offline result."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    sub = await js.subscribe(subjects.OFFLINE_RESULTS_PREFIX + ".>", ordered_consumer=True)
    info = await js.stream_info(subjects.OFFLINE_RESULTS_STREAM)
    tokens = 0
    for _ in range(info.state.messages):
        msg = await sub.next_msg(timeout=10)
        body = json.loads(msg.data)["response"]["body"]
        tokens += body.get("usage", {}).get("completion_tokens", 0)
    await nc.close()
    return tokens


def run(name: str, args, online, backlog, window: float | None) -> dict:
    log_dir = Path(args.log_dir) / name
    config = ClusterConfig(
        host="127.0.0.1", port=free_port(), log_dir=str(log_dir), log_level="WARNING",
        stop_grace=5.0,
    )  # fmt: skip
    engine_args = ["--num-threads", str(args.threads), "--kv-cache-gb", str(args.kv_cache_gb)]
    engine_args += ["--max-model-len", "4096"]
    print(f"== {name}: logs in {log_dir}", file=sys.stderr)
    env_key = "XLLM_OFFLINE_CONCURRENCY"  # the gateway's offline workers: only in "xllm"
    os.environ[env_key] = str(args.offline_concurrency if name == "xllm" else 0)
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        model = json.load(_NO_PROXY.open(config.base_url + "/models"))["data"][0]["id"]
        busy0 = busy_seconds(config)
        naive = None
        if name == "xllm":
            asyncio.run(publish_backlog(cluster.nats_url, backlog))
        elif name in ("naive", "offline"):
            naive = HttpBacklog(config, model, backlog, args.offline_concurrency)
            naive.start()
        start = time.monotonic()
        result: dict = {}
        if online:
            client = ClientConfig(config.base_url, model)
            bench = run_load(online, client, LoadConfig(timeout=600.0, progress=False, warmup=0))
            summary = summarize(bench.records, bench.duration, Slo(args.slo_ttft, args.slo_tpot))
            print(format_table(summary), file=sys.stderr)
            result |= {
                "ttft_p50_ms": round(summary.ttft_ms.p50, 1),
                "ttft_p99_ms": round(summary.ttft_ms.p99, 1),
                "tpot_p50_ms": round(summary.tpot_ms.p50, 2),
                "tpot_p99_ms": round(summary.tpot_ms.p99, 2),
                "slo_attainment": round(summary.slo_attainment, 4),
                "completed": summary.completed,
                "failed": summary.failed,
            }
        else:
            time.sleep(window)
        elapsed = time.monotonic() - start
        busy = busy_seconds(config) - busy0
        if naive is not None:
            naive.stop.set()
            tokens = sum(t for end, t in naive.done if end <= start + elapsed)
        elif name == "xllm":
            tokens = asyncio.run(nats_tokens_done(cluster.nats_url))
        else:
            tokens = 0
    os.environ.pop(env_key, None)
    return result | {
        "window_s": round(elapsed, 2),
        "busy_fraction": round(busy / elapsed, 3),
        "offline_tokens": tokens,
        "offline_tok_s": round(tokens / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trace-start", type=float, default=180.0)
    parser.add_argument("--trace-duration", type=float, default=10.0)
    parser.add_argument("--time-scale", type=float, default=6.0)
    parser.add_argument("--length-scale", type=float, default=0.25)
    parser.add_argument("--backlog", type=int, default=600, help="offline requests queued")
    parser.add_argument("--offline-len", type=int, default=128, help="output tokens each")
    parser.add_argument("--offline-concurrency", type=int, default=8)
    parser.add_argument("--slo-ttft", type=float, default=1000.0, help="ms")
    parser.add_argument("--slo-tpot", type=float, default=100.0, help="ms")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--kv-cache-gb", type=float, default=1.0)
    parser.add_argument("--runs", default="online,offline,xllm,naive")
    parser.add_argument("--log-dir", default=tempfile.mkdtemp(prefix="xllm-coloc-"))
    args = parser.parse_args()

    maker = PromptMaker(None, chat=False, seed=0)
    online = trace_workload(
        "azure-code", maker, 0, start=args.trace_start, duration=args.trace_duration,
        time_scale=args.time_scale, length_scale=args.length_scale,
    )  # fmt: skip
    if not online:
        parser.error("the trace window holds no request; widen --trace-duration")
    length = LengthRange(args.offline_len, args.offline_len)
    backlog = sharegpt_workload(args.backlog, length, maker, seed=1)
    results: dict[str, dict] = {}
    for name in args.runs.split(","):
        window = results["online"]["window_s"] if "online" in results else 60.0
        with_online = online if name != "offline" else None
        results[name] = run(name, args, with_online, backlog if name != "online" else [], window)
    alone, capacity = results.get("online"), results.get("offline")
    ratios = {}
    if alone and capacity:
        idle = capacity["offline_tok_s"] * (1 - alone["busy_fraction"])
        for name in ("xllm", "naive"):
            if name in results:
                ratios[name] = {
                    "attainment_vs_alone": round(
                        results[name]["slo_attainment"] / max(1e-9, alone["slo_attainment"]), 3
                    ),
                    "offline_vs_idle_capacity": round(results[name]["offline_tok_s"] / idle, 3),
                }
        ratios["idle_capacity_tok_s"] = round(idle, 2)
    emit(
        {
            "benchmark": "colocation",
            "model": "qwen3-tiny-bf16",
            "online": f"azure-code start={args.trace_start:g}s duration={args.trace_duration:g}s "
            f"time x{args.time_scale:g} length x{args.length_scale:g} ({len(online)} requests)",
            "offline": f"sharegpt x{args.backlog}, {args.offline_len} tokens each",
            "slo_ms": {"ttft": args.slo_ttft, "tpot": args.slo_tpot},
            "results": results,
            "ratios": ratios,
            "targets": {"attainment_vs_alone": 0.95, "offline_vs_idle_capacity": 0.5},
        }
    )


if __name__ == "__main__":
    main()
