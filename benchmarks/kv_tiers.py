"""The KV tiers on the Mooncake trace: prefix hit rate by tier, and TTFT, for device-only vs
+host vs +host+store, in one run.

The slice of the trace is `prefix_routing.py`'s (same flags, same defaults: a window of the
Mooncake conversation trace, thinned to whole prefix groups, lengths x 1/32 so a trace block
is one 16-token KV block), replayed on a fresh `xllm up` cluster per setup: `--instances`
PD-colocated instances of the tiny demo model, cache-aware placement, and a device pool of
only `--num-kv-blocks` blocks per instance (far below the slice's working set, so prefixes
are evicted from the device and come back from the slower tiers, or are recomputed):

* `device`: the pool alone (today's behaviour);
* `host`:   + `--host-kv-gb` of host memory per instance (write-through, loaded back);
* `store`:  + host + the cluster store (Mooncake Store, `--kv-store`): every block put
            there, any instance fetches what another computed.

`--size small` runs the `small` demo model instead (Qwen3-0.6B's shapes, bf16), where a
prefill costs what it does on a real model on this CPU (tens of ms a token), so a prefix hit
from host memory or the store shows in TTFT; its defaults are a thinner slice (33 requests)
and a device pool of 96 blocks (each ~1.8 MB), meant to keep one run of the three setups
near 8 minutes on 2 cores (an estimate, not measured yet). `--size tiny` (the default) is the tiny demo model, where prefill is
nearly free and the TTFT differences are mostly queueing.

`--workload multiturn` (with `--size small`: the command that shows the tiers' TTFT gain)
replaces the trace with conversations in rounds (`multiturn_workload`: `--sessions` 8 of
`--turns` 4, each turn's prompt the session's `--context-len` 256-token context and history
plus a `--user-len` 32-token message, `--reply-len` 16 tokens out), `--concurrency` 2 at a
time, on 48-block device pools: a round's prompts (216 blocks) are far more than the two
pools hold, so every session's prefix has left the device by its next turn, while 0.5 GiB of
host memory (~290 small-model blocks per instance) still holds it. Why the trace slice does
not show this: its reuse is almost all recent (within the device pool), the few prefixes
reused at a distance come with prompts longer than a 32-block pool, and a load that found
the pool busy was recomputed instead (fixed: the request now waits for room).

Per setup: hit tokens by tier (device = hits minus what the tiers loaded; host / disk /
store = blocks loaded from there x block size), over the instances' queried prompt tokens,
as differences across the replay (the warm-up does not count); TTFT mean/p50/p99 and
failures from the client; `vs_device`: device-only's TTFT mean/p50/p99 over each other
setup's (> 1: faster than device-only).

    PYTHONPATH=shared:. .venv/bin/python benchmarks/kv_tiers.py [--size small] [--setups ...]
    PYTHONPATH=shared:. .venv/bin/python benchmarks/kv_tiers.py --size small --workload multiturn

Prints one JSON line. Timing figures mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fractions import Fraction

from common import demo_model, emit
from prefix_routing import KV_BLOCK_SIZE, cluster_state, trace_slice, warmup_requests

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import summarize
from xllm.cli.bench.runner import LoadConfig, run_load
from xllm.cli.bench.workloads import (
    BenchRequest,
    PromptMaker,
    multiturn_workload,
    requests_from_trace,
)
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.cli.commands.bench import first_model

SETUPS = ("device", "host", "store")
TIERS = ("host", "disk", "store")
SIZE_DEFAULTS = {
    "tiny": {},
    "small": dict(
        trace_duration=900.0, keep=0.01, max_model_len=1024, num_kv_blocks=96, host_kv_gb=0.5
    ),
}
"""`--size`: the defaults that differ from the tiny model's (an explicit flag still wins)."""
WORKLOAD_DEFAULTS = {
    "trace": {},
    "multiturn": dict(num_kv_blocks=48, max_model_len=1024, host_kv_gb=0.5, concurrency=2),
}
"""`--workload`: the defaults that differ from the trace's (over `--size`'s)."""


def counters(base_url: str, settle: float) -> dict[str, int]:
    """Cluster-wide prefix counters, in tokens, once the heartbeats have caught up."""
    time.sleep(settle)
    total = {"queried": 0, "hit": 0, **{t: 0 for t in TIERS}}
    for hb in cluster_state(base_url)["instances"]:
        total["queried"] += hb["kv"]["prefix_queried_tokens"]
        total["hit"] += hb["kv"]["prefix_hit_tokens"]
        for tier in TIERS:
            total[tier] += hb["tiers"][tier]["hits"] * hb["kv_block_size"]
    return total


def run_setup(setup: str, requests: list[BenchRequest], args: argparse.Namespace) -> dict:
    config = ClusterConfig(
        model=args.model,
        host="127.0.0.1",
        port=free_port(),
        instances=args.instances,
        policy="cache-aware",
        kv_store=setup == "store",
        log_dir=tempfile.mkdtemp(prefix=f"xllm-kv-tiers-{setup}-"),
        log_level="WARNING",
    )
    engine_args = [
        "--max-model-len", str(args.max_model_len),
        "--num-kv-blocks", str(args.num_kv_blocks),
        "--num-threads", str(args.num_threads),
    ]  # fmt: skip
    if setup != "device":
        engine_args += ["--host-kv-gb", str(args.host_kv_gb)]
    if setup == "store":
        engine_args += ["--kv-store-segment-gb", str(args.host_kv_gb)]
    print(f"{setup}: starting the cluster (logs in {config.log_dir})", file=sys.stderr)
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        base_url = config.base_url
        client = ClientConfig(base_url, first_model(base_url))
        warm = run_load(
            warmup_requests(2 * args.instances, args.seed), client, LoadConfig(warmup=0)
        )
        if not all(r.ok for r in warm.records):
            raise RuntimeError(f"{setup}: warm-up failed: {warm.records}")
        before = counters(base_url, args.settle)
        load = LoadConfig(
            concurrency=args.concurrency or None,
            seed=args.seed,
            timeout=args.timeout,
            progress=args.progress,
            warmup=0,
        )
        bench = run_load(requests, client, load)
        after = counters(base_url, args.settle)
    delta = {k: after[k] - before[k] for k in after}
    queried = delta["queried"] or 1
    by_tier = {t: round(delta[t] / queried, 4) for t in TIERS}
    by_tier["device"] = round((delta["hit"] - sum(delta[t] for t in TIERS)) / queried, 4)
    summary = summarize(bench.records, bench.duration)
    return {
        "hit_rate": round(delta["hit"] / queried, 4),
        "hit_rate_by_tier": by_tier,
        "queried_tokens": delta["queried"],
        "ttft_mean_ms": round(summary.ttft_ms.mean, 1),
        "ttft_p50_ms": round(summary.ttft_ms.p50, 1),
        "ttft_p99_ms": round(summary.ttft_ms.p99, 1),
        "requests": summary.requests,
        "failed": summary.failed,
        "failures": summary.failures,
        "duration_s": round(summary.duration_s, 2),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    scale = lambda text: float(Fraction(text))  # noqa: E731
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument(
        "--size", choices=SIZE_DEFAULTS, default="tiny", help="demo model (unless --model)"
    )
    parser.add_argument("--workload", choices=WORKLOAD_DEFAULTS, default="trace")
    parser.add_argument("--trace-start", type=float, default=0.0)
    parser.add_argument("--trace-duration", type=float, default=900.0)
    parser.add_argument("--keep", type=float, default=0.06)
    parser.add_argument("--length-scale", type=scale, default=1 / 32)
    parser.add_argument("--time-scale", type=float, default=0.12)
    parser.add_argument("--sessions", type=int, default=8, help="multiturn: conversations")
    parser.add_argument("--turns", type=int, default=4, help="multiturn: turns a session")
    parser.add_argument("--context-len", type=int, default=256, help="multiturn: tokens")
    parser.add_argument("--user-len", type=int, default=32, help="multiturn: tokens a message")
    parser.add_argument("--reply-len", type=int, default=16, help="multiturn: tokens a reply")
    parser.add_argument(
        "--concurrency", type=int, default=0, help="requests in flight (0: the trace's times)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--instances", type=int, default=2)
    parser.add_argument("--model", default="", help="model folder; default: the tiny demo")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--num-kv-blocks", type=int, default=300, help="device pool/instance")
    parser.add_argument("--host-kv-gb", type=float, default=0.25, help="host tier/instance")
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--settle", type=float, default=1.0)
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--dry-run", action="store_true")
    known = parser.parse_known_args(argv)[0]
    parser.set_defaults(**{**SIZE_DEFAULTS[known.size], **WORKLOAD_DEFAULTS[known.workload]})
    args = parser.parse_args(argv)
    if not args.model and args.size != "tiny":
        args.model = str(demo_model("qwen3", args.size))
    return args


def trace_requests(args: argparse.Namespace) -> tuple[list[BenchRequest], dict]:
    rows, too_long = trace_slice(args)
    requests = requests_from_trace(
        rows, PromptMaker(chat=False, seed=args.seed), args.length_scale, args.seed
    )
    return requests, {
        "trace": "mooncake",
        "dropped_too_long": too_long,
        "distinct_blocks": len({h for t in rows for h in t.hash_ids}),
    }


def multiturn_requests(args: argparse.Namespace) -> tuple[list[BenchRequest], dict]:
    maker = PromptMaker(chat=False, seed=args.seed)
    requests = multiturn_workload(
        args.sessions, args.turns, args.context_len, args.user_len, args.reply_len, maker
    )
    return requests, {
        "multiturn": {
            k: getattr(args, k)
            for k in ("sessions", "turns", "context_len", "user_len", "reply_len", "concurrency")
        },
        "round_blocks": sum(r.input_len for r in requests[-args.sessions :]) // KV_BLOCK_SIZE,
    }


def versus_device(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """Device-only's TTFT over each other setup's (> 1: that setup is faster)."""
    base = results.get("device")
    if base is None:
        return {}
    keys = ("ttft_mean_ms", "ttft_p50_ms", "ttft_p99_ms")
    return {
        setup: {
            k.replace("_ms", "_speedup"): round(base[k] / r[k], 3) if r[k] else 0.0 for k in keys
        }
        for setup, r in results.items()
        if setup != "device"
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    make = multiturn_requests if args.workload == "multiturn" else trace_requests
    requests, workload = make(args)
    workload.update(
        requests=len(requests),
        input_tokens=sum(r.input_len for r in requests),
        device_blocks_per_instance=args.num_kv_blocks,
        kv_block_size=KV_BLOCK_SIZE,
    )
    print(json.dumps(workload), file=sys.stderr)
    if args.dry_run or not requests:
        return
    results = {setup: run_setup(setup, requests, args) for setup in args.setups}
    emit(
        {
            "benchmark": "kv_tiers",
            "workload": workload,
            "setups": results,
            "vs_device": versus_device(results),
        }
    )


if __name__ == "__main__":
    main()
