"""Cache-aware routing: prefix hit rate and TTFT of the placement policies, in one run.

Replays one slice of the Mooncake conversation trace on a fresh cluster per policy
(`cache-aware`, `least-load`, `round-robin`; 2 PD-colocated instances of the tiny demo model,
as `xllm up --instances 2 --policy P` would start them) and compares what each policy gets
out of the instances' prefix caches.

The slice, the same for every policy:

* the trace window `[--trace-start, + --trace-duration)` seconds;
* thinned to a random `--keep` share of its prefix groups (requests with the same first two
  `hash_ids`: block 0 is the system prompt every request shares, and the turns of one
  conversation share the blocks after it). Whole groups are kept or dropped, so the reuse
  within the slice stays that of the trace while the load fits 2 CPU cores;
* lengths x `--length-scale` (1/32: a 512-token trace block becomes 16 tokens, one KV block,
  so shared trace blocks are shared whole KV blocks), times x `--time-scale`;
* requests longer than the model's context (prompt + output) are dropped and counted.

Prompts are built from the `hash_ids` (`xllm.cli.bench.workloads`): requests sharing leading
hash ids share a prompt prefix. Each request asks for its traced output length exactly.

Per policy: warm-up requests (random prompts, unrelated to the trace), then the replay
through `xllm.cli.bench` (streaming `/v1/completions`). The hit rate is the cluster's own,
from the gateway's `/cluster`: prefix hit tokens / queried tokens of the instances, taken
as the difference across the replay so that the warm-up does not count. `ideal_hit_rate`
is the bound a single instance with an unbounded cache would reach on the slice (every
block ever computed stays findable): what a policy that always finds the prefix would get.

    .venv/bin/python benchmarks/prefix_routing.py [--policies ...] [--progress]

With the defaults: 179 requests, 78,506 prompt tokens, a 107 s replay per policy; about
7 to 12 minutes in all on 2 busy cores (a cluster takes 20 s to 2 min to start there).

Prints one JSON line: per-policy figures (hit rate, TTFT mean/p50/p99, failures,
throughput, per-instance split) and the ratios cache-aware / least-load and
cache-aware / round-robin of hit rate and mean TTFT.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import urllib.request
from dataclasses import replace
from fractions import Fraction

from common import emit

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import summarize
from xllm.cli.bench.runner import LoadConfig, run_load
from xllm.cli.bench.traces import TraceRequest, load_trace
from xllm.cli.bench.workloads import BenchRequest, PromptMaker, requests_from_trace
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.cli.commands.bench import first_model
from xllm.engine.prefix_hash import block_hashes

POLICIES = ("cache-aware", "least-load", "round-robin")
KV_BLOCK_SIZE = 16  # the engine's default `--block-size`
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# -- the workload ---------------------------------------------------------------------------


def keep_group(t: TraceRequest, keep: float, seed: int) -> bool:
    """Whether `t`'s prefix group (its first two hash ids) is in the slice: a fixed random
    draw per group, so every turn of a conversation is kept or dropped together."""
    group = t.hash_ids[:2]
    return random.Random(f"{seed}:{group}").random() < keep


def trace_slice(args: argparse.Namespace) -> tuple[list[TraceRequest], int]:
    """The slice's trace rows (times re-based to its first request), and how many rows of
    the kept groups were dropped for not fitting the context."""
    rows = load_trace(
        "mooncake",
        start=args.trace_start,
        duration=args.trace_duration,
        time_scale=args.time_scale,
        length_scale=args.length_scale,
    )
    rows = [t for t in rows if keep_group(t, args.keep, args.seed)]
    fits = [t for t in rows if t.input_len + t.output_len <= args.max_model_len]
    t0 = fits[0].arrival if fits else 0.0
    return [replace(t, arrival=t.arrival - t0) for t in fits], len(rows) - len(fits)


def ideal_hit_rate(requests: list[BenchRequest]) -> float:
    """Hit tokens / prompt tokens of one instance whose cache never forgets, in arrival
    order (at most `(n - 1) // block` blocks can hit, as in the engine)."""
    seen: set[int] = set()
    hits = queried = 0
    for r in requests:
        chain = block_hashes(r.prompt, KV_BLOCK_SIZE)
        usable = chain[: (len(r.prompt) - 1) // KV_BLOCK_SIZE]
        n = next((i for i, h in enumerate(usable) if h not in seen), len(usable))
        hits += n * KV_BLOCK_SIZE
        queried += len(r.prompt)
        seen.update(chain)
    return hits / queried if queried else 0.0


def warmup_requests(n: int, seed: int) -> list[BenchRequest]:
    """`n` random 64-token prompts (they share no 16-token block with the trace's)."""
    maker, rng = PromptMaker(chat=False), random.Random(f"warmup:{seed}")
    return [BenchRequest(maker.make(64, rng), 64, 8) for _ in range(n)]


# -- one policy -----------------------------------------------------------------------------


def cluster_state(base_url: str) -> dict:
    url = base_url.removesuffix("/v1") + "/cluster"
    with _NO_PROXY.open(url, timeout=30) as response:
        return json.load(response)


def prefix_counters(base_url: str, settle: float) -> dict[str, tuple[int, int]]:
    """instance -> (queried, hit) prefix tokens, once the heartbeats have caught up."""
    time.sleep(settle)  # > the instances' heartbeat interval (0.25 s)
    return {
        hb["instance_id"]: (hb["kv"]["prefix_queried_tokens"], hb["kv"]["prefix_hit_tokens"])
        for hb in cluster_state(base_url)["instances"]
    }


def run_policy(policy: str, requests: list[BenchRequest], args: argparse.Namespace) -> dict:
    config = ClusterConfig(
        model=args.model,
        host="127.0.0.1",
        port=free_port(),
        instances=args.instances,
        policy=policy,
        log_dir=tempfile.mkdtemp(prefix=f"xllm-prefix-{policy}-"),
        log_level="WARNING",
    )
    engine_args = [
        "--max-model-len", str(args.max_model_len),
        "--kv-cache-gb", str(args.kv_cache_gb),
        "--num-threads", str(args.num_threads),
    ]  # fmt: skip
    print(f"{policy}: starting the cluster (logs in {config.log_dir})", file=sys.stderr)
    t0 = time.perf_counter()
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        print(f"{policy}: ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        base_url = config.base_url
        state = cluster_state(base_url)
        assert state["policy"] == policy, state["policy"]
        client = ClientConfig(base_url, first_model(base_url))
        quiet = LoadConfig(progress=False, warmup=0)
        warm = run_load(warmup_requests(2 * args.instances, args.seed), client, quiet)
        if not all(r.ok for r in warm.records):
            raise RuntimeError(f"{policy}: warm-up failed: {warm.records}")
        before = prefix_counters(base_url, args.settle)
        load = LoadConfig(seed=args.seed, timeout=args.timeout, progress=args.progress, warmup=0)
        bench = run_load(requests, client, load)
        after = prefix_counters(base_url, args.settle)
        print(f"{policy}: replayed in {bench.duration:.0f} s; stopping", file=sys.stderr)
        t0 = time.perf_counter()
    print(f"{policy}: stopped in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    summary = summarize(bench.records, bench.duration)
    per_instance = {}
    for instance_id, (queried, hit) in sorted(after.items()):
        queried0, hit0 = before.get(instance_id, (0, 0))
        per_instance[instance_id] = {"queried_tokens": queried - queried0, "hit_tokens": hit - hit0}
    queried = sum(v["queried_tokens"] for v in per_instance.values())
    hits = sum(v["hit_tokens"] for v in per_instance.values())
    return {
        "hit_rate": round(hits / queried, 4) if queried else 0.0,
        "hit_tokens": hits,
        "queried_tokens": queried,
        "client_cached_tokens": summary.cached_input_tokens,
        "ttft_mean_ms": round(summary.ttft_ms.mean, 1),
        "ttft_p50_ms": round(summary.ttft_ms.p50, 1),
        "ttft_p99_ms": round(summary.ttft_ms.p99, 1),
        "e2e_mean_ms": round(summary.e2e_ms.mean, 1),
        "requests": summary.requests,
        "failed": summary.failed,
        "failures": summary.failures,
        "duration_s": round(summary.duration_s, 2),
        "request_throughput": round(summary.request_throughput, 3),
        "output_throughput": round(summary.output_throughput, 2),
        "total_token_throughput": round(summary.total_token_throughput, 1),
        "per_instance": per_instance,
    }


# -- main -----------------------------------------------------------------------------------


def ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.epilog = "\n\n".join(__doc__.split("\n\n")[1:])
    scale = lambda text: float(Fraction(text))  # noqa: E731 ("1/32" or 0.03125)
    trace = parser.add_argument_group("the slice of the Mooncake trace")
    trace.add_argument("--trace-start", type=float, default=0.0, help="seconds into the trace")
    trace.add_argument("--trace-duration", type=float, default=900.0, help="seconds of trace")
    trace.add_argument("--keep", type=float, default=0.06, help="share of prefix groups kept")
    trace.add_argument("--length-scale", type=scale, default=1 / 32, help="e.g. 1/32 or 1/16")
    trace.add_argument("--time-scale", type=float, default=0.12, help="x inter-arrival times")
    trace.add_argument("--seed", type=int, default=0, help="groups kept, prompt tokens")
    cluster = parser.add_argument_group("the cluster")
    cluster.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    cluster.add_argument("--instances", type=int, default=2, help="PD-colocated instances")
    cluster.add_argument("--model", default="", help="model folder; default: the tiny demo")
    cluster.add_argument("--max-model-len", type=int, default=4096)
    cluster.add_argument("--kv-cache-gb", type=float, default=0.5, help="per instance")
    cluster.add_argument("--num-threads", type=int, default=1, help="torch threads/instance")
    run = parser.add_argument_group("the run")
    run.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    run.add_argument("--settle", type=float, default=1.0, help="seconds before reading /cluster")
    run.add_argument("--progress", action="store_true", help="a progress bar per replay")
    run.add_argument("--dry-run", action="store_true", help="describe the slice and stop")
    args = parser.parse_args(argv)
    if args.length_scale * 512 % KV_BLOCK_SIZE:
        parser.error(
            f"--length-scale {args.length_scale}: a 512-token trace block would become "
            f"{args.length_scale * 512:g} tokens, not a multiple of the {KV_BLOCK_SIZE}-token "
            "KV block, and shared prefixes would end inside KV blocks"
        )
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rows, too_long = trace_slice(args)
    requests = requests_from_trace(
        rows, PromptMaker(chat=False, seed=args.seed), args.length_scale, args.seed
    )
    workload = {
        "trace": "mooncake",
        "trace_window_s": [args.trace_start, args.trace_start + args.trace_duration],
        "keep_groups": args.keep,
        "length_scale": args.length_scale,
        "time_scale": args.time_scale,
        "requests": len(requests),
        "dropped_too_long": too_long,
        "input_tokens": sum(r.input_len for r in requests),
        "output_tokens": sum(r.output_len for r in requests),
        "max_input_len": max((r.input_len for r in requests), default=0),
        "replay_s": round(max((r.arrival or 0.0 for r in requests), default=0.0), 1),
        "ideal_hit_rate": round(ideal_hit_rate(requests), 4),
    }
    print(json.dumps(workload), file=sys.stderr)
    if args.dry_run or not requests:
        return
    results = {}
    for policy in args.policies:
        results[policy] = run_policy(policy, requests, args)
        print(f"{policy}: {json.dumps(results[policy])}", file=sys.stderr)
    result = {
        "benchmark": "prefix_routing",
        "model": args.model or "qwen3-tiny",
        "instances": args.instances,
        "workload": workload,
        "policies": results,
    }
    if "cache-aware" in results:
        ca = results["cache-aware"]
        for other in ("least-load", "round-robin"):
            if other in results:
                result[f"cache-aware/{other}"] = {
                    "hit_rate": ratio(ca["hit_rate"], results[other]["hit_rate"]),
                    "ttft_mean": ratio(ca["ttft_mean_ms"], results[other]["ttft_mean_ms"]),
                }
    result["failures_total"] = sum(r["failed"] for r in results.values())
    emit(result)


if __name__ == "__main__":
    main()
