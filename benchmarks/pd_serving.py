"""Prefill/decode disaggregation, live: colocated vs static PD vs slo-pd, same requests, one run.

A bursty slice of the Azure code trace (by default the 20 s from minute 3: 161 requests,
29 then 132 in 10 s) with lengths x 1/4 and arrivals replayed `--time-scale` x slower, sent
by `xllm.cli.bench` (open loop, streaming completions, exact output lengths) to three clusters of
the same number of instances of the tiny demo model, one after another:

  * colocated:  `--instances N`, policy least-load;
  * static PD:  `--prefill P --decode D`, policy least-load;
  * slo-pd:     `--prefill P --decode D`, policy slo-pd with the same SLOs as the report
    (it may flip instances between prefill and decode; `--min-decode-instances 1`), SLO
    admission at the target (`--slo-admission 1`, as `xllm sim sweep`'s slo-pd arm) and
    the cost model for its pre-analysis (`--cost-profile cpu-local --cost-model <model>`).

Beside each configuration's live figures, the simulator's prediction for the same setup
(`xllm sim` on the same trace slice, the `--sim-profile` hardware profile, the demo model's
config, the same engine options and scheduler options): `sim` in the JSON, and
`sim_vs_live`, sim / live of the SLO attainment (within 0.8-1.2 = within 20%) and of the
latency percentiles. The sim models what serving adds to the engine steps the profile
times (`services/scheduler/sim/serving.py`), each measured here: before its load, each
cluster gets `--probes` requests one at a time (the trace slice's median prompt, 16 output
tokens), and `fit_overheads` reads the per-request hop, the per-step loop cost and (on
static PD) the prefill hop and the handoff from their times against the cost model; the
instances share the cores this process may run on (`overheads` in the JSON). slo-pd's
probes run whole (under capacity it places as colocated does), so its prefill hop and
handoff are static PD's when that configuration ran first.

    .venv/bin/python benchmarks/pd_serving.py [--prefill 1 --decode 2 --time-scale 8 \
        --slo-ttft 1000 --slo-tpot 100]

Prints one JSON line: per configuration TTFT and TPOT p50/p99 (ms), the gap from the first
to the second token (the PD handoff) and between later tokens, SLO attainment, goodput
(req/s), failures, role flips ordered by the scheduler up to the end of the load (from
`/cluster`), KV bytes sent between instances and the mean transfer time, KV blocks and tokens
still held once the run has drained (must be 0), and ratios vs colocated. Each
configuration's logs stay in `--log-dir/<name>/`; a table per configuration goes to stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import emit

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import LatencyStats, Slo, format_table, summarize
from xllm.cli.bench.runner import LoadConfig, run_load
from xllm.cli.bench.workloads import BenchRequest, PromptMaker, trace_workload
from xllm.cli.cluster import ClusterConfig, demo_model, free_port, serving_cluster


def cluster_state(config: ClusterConfig) -> dict:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)


class RolePoller(threading.Thread):
    """Polls `/cluster` once a second; keeps the most prefill instances seen at once."""

    def __init__(self, config: ClusterConfig):
        super().__init__(daemon=True)
        self.config = config
        self.done = threading.Event()
        self.max_prefill = 0

    def run(self) -> None:
        while not self.done.wait(1.0):
            try:
                roles = cluster_state(self.config).get("role_counts", {})
            except OSError:
                continue
            self.max_prefill = max(self.max_prefill, roles.get("prefill", 0))


def settled_state(config: ClusterConfig, timeout: float = 20.0) -> dict:
    """`/cluster` once every instance's heartbeat shows no sequence (or after `timeout`)."""
    deadline = time.monotonic() + timeout
    while True:
        state = cluster_state(config)
        busy = sum(
            i["kv"]["blocks_used"] + i["load"]["num_tokens_in_flight"] for i in state["instances"]
        )
        if busy == 0 or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def run_config(
    name: str, config: ClusterConfig, engine_args, requests, slo: Slo, probes=()
) -> tuple[dict, list]:
    """The configuration's figures, and the records of `probes` sent one at a time first."""
    print(f"== {name}: logs in {config.log_dir}", file=sys.stderr)
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        model = json.load(urllib.request.urlopen(config.base_url + "/models"))["data"][0]["id"]
        client = ClientConfig(config.base_url, model)
        probed = run_load(list(probes), client, LoadConfig(concurrency=1, progress=False))
        probed = probed.records if probes else []
        poller = RolePoller(config)
        poller.start()
        bench = run_load(requests, client, LoadConfig(timeout=600.0, progress=False))
        poller.done.set()
        poller.join()
        state = settled_state(config)
    summary = summarize(bench.records, bench.duration, slo)
    print(format_table(summary), file=sys.stderr)
    instances = state["instances"]
    # Token 1 -> token 2: in the PD shapes the handoff (token 1 from the prefill instance,
    # token 2 from the decode instance once its KvReady arrived).
    first_gaps = LatencyStats.of([r.itl[0] for r in bench.records if r.ok and r.itl])
    later_gaps = LatencyStats.of([g for r in bench.records if r.ok for g in r.itl[1:]])
    return {
        "ttft_p50_ms": round(summary.ttft_ms.p50, 1),
        "ttft_p99_ms": round(summary.ttft_ms.p99, 1),
        "tpot_p50_ms": round(summary.tpot_ms.p50, 2),
        "tpot_p99_ms": round(summary.tpot_ms.p99, 2),
        "first_gap_p50_ms": round(first_gaps.p50, 1),
        "first_gap_p99_ms": round(first_gaps.p99, 1),
        "later_gap_p50_ms": round(later_gaps.p50, 1),
        "later_gap_p99_ms": round(later_gaps.p99, 1),
        "e2e_p99_ms": round(summary.e2e_ms.p99, 1),
        "slo_attainment": round(summary.slo_attainment, 4),
        "goodput_req_s": round(summary.goodput, 3),
        "duration_s": round(summary.duration_s, 2),
        "completed": summary.completed,
        "failed": summary.failed,
        "failures": summary.failures,
        "role_flips": state.get("num_role_flips", 0),
        "max_prefill_instances": poller.max_prefill,
        "kv_bytes_sent": sum(i["transfer"]["bytes_sent"] for i in instances),
        "kv_transfers": sum(i["transfer"]["transfers"] for i in instances),
        "kv_transfer_mean_ms": round(
            1e3
            * sum(i["transfer"]["seconds_sending"] for i in instances)
            / max(1, sum(i["transfer"]["transfers"] for i in instances)),
            1,
        ),
        "preemptions": sum(i["preemption"]["num_preemptions"] for i in instances),
        "kv_blocks_held_after": sum(i["kv"]["blocks_used"] for i in instances),
        "tokens_in_flight_after": sum(i["load"]["num_tokens_in_flight"] for i in instances),
        "log_dir": config.log_dir,
    }, probed


RATIO_KEYS = ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "slo_attainment")


def ratios(result: dict, base: dict) -> dict:
    return {k: round(result[k] / base[k], 3) if base[k] else None for k in RATIO_KEYS}


def sim_prediction(
    args: argparse.Namespace, name: str, shape: dict, model: Path, overheads=None
) -> dict:
    """The simulator's figures for configuration `name`, run as `xllm sim` would, with
    the serving `overheads` measured live (None: none)."""
    from services.scheduler.sim import run as sim_run
    from services.scheduler.sim import tool

    parser = argparse.ArgumentParser()
    tool.add_parser(parser.add_subparsers())
    pd = "" if "instances" in shape else f"{args.prefill}:{args.decode}"
    sim_args = parser.parse_args(
        [
            "sim", "--trace", "azure-code", "--start", str(args.trace_start),
            "--duration", str(args.trace_duration), "--time-scale", str(args.time_scale),
            "--length-scale", str(args.length_scale), "--profile", args.sim_profile,
            "--model-config", str(model), "--dtype", "bfloat16",
            "--kv-cache-gb", str(args.kv_cache_gb), "--slo-ttft", str(args.slo_ttft / 1e3),
            "--slo-tpot", str(args.slo_tpot / 1e3), "--pd", pd,
            "--min-decode-instances", str(shape.get("min_decode_instances", 2)),
            "--slo-admission", str(shape.get("slo_admission", 0.0)),
            *overhead_args(overheads),
        ]
    )  # fmt: skip
    setup = sim_run.setup_from_args(sim_args, args.prefill + args.decode)
    report = sim_run.simulate(setup, shape["policy"])
    return {
        "ttft_p50_ms": round(1e3 * report.ttft_p50, 1),
        "ttft_p99_ms": round(1e3 * report.ttft_p99, 1),
        "tpot_p50_ms": round(1e3 * report.tpot_p50, 2),
        "tpot_p99_ms": round(1e3 * report.tpot_p99, 2),
        "slo_attainment": round(report.slo_attainment, 4),
        "goodput_req_s": round(report.goodput_rps, 3),
        "rejected": report.num_rejected,
        "role_flips": report.role_flips,
        "roles_at_end": report.final_roles,
    }


def overhead_args(o) -> list[str]:
    if o is None:
        return []
    return [
        "--request-overhead", str(o.request), "--prefill-hop", str(o.prefill_hop),
        "--handoff-overhead", str(o.handoff), "--step-overhead", str(o.step),
        "--cores", str(o.cores),
    ]  # fmt: skip


def probe_requests(requests, args: argparse.Namespace) -> list[BenchRequest]:
    """`--probes` requests of the slice's median prompt (within one step) and 16 outputs."""
    if not requests:
        raise SystemExit("the trace slice holds no requests")
    n = min(sorted(r.input_len for r in requests)[len(requests) // 2], 2048)
    maker, rng = PromptMaker(None, chat=False, seed=args.seed + 1), random.Random(args.seed + 1)
    return [BenchRequest(maker.make(n, rng), n, 16) for _ in range(args.probes)]


def measured_overheads(name: str, shape: dict, records, model: Path, args, measured: dict):
    """The serving overheads configuration `name`'s probes show (sim/serving.py)."""
    from services.scheduler.cost_model import load_model_config
    from services.scheduler.sim.serving import Probe, ServingOverheads, fit_overheads
    from xllm.hardware import load_profile

    ok = [r for r in records if r.ok and r.ttft is not None and len(r.itl) >= 2]
    if not ok:
        return None
    split = shape["policy"] == "least-load" and "prefill" in shape
    probes = [Probe(r.input_len, r.ttft, tuple(r.itl), split) for r in ok]
    cores = len(os.sched_getaffinity(0))
    config, hw = load_model_config(str(model), "bfloat16"), load_profile(args.sim_profile)
    fitted = fit_overheads(probes, config, hw, 2048, cores, whole=measured.get("colocated"))
    static = measured.get("static-pd")
    if shape["policy"] == "slo-pd" and static is not None:  # its probes ran whole
        fitted = ServingOverheads(
            fitted.request, static.prefill_hop, static.handoff, fitted.step, cores
        )
    return fitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill", type=int, default=1)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--trace-start", type=float, default=180.0)
    parser.add_argument("--trace-duration", type=float, default=20.0)
    parser.add_argument("--time-scale", type=float, default=8.0)
    parser.add_argument("--length-scale", type=float, default=0.25)
    parser.add_argument("--slo-ttft", type=float, default=1000.0, help="ms")
    parser.add_argument("--slo-tpot", type=float, default=100.0, help="ms")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per instance")
    parser.add_argument("--kv-cache-gb", type=float, default=0.5)
    parser.add_argument("--configs", default="colocated,static-pd,slo-pd")
    parser.add_argument("--log-dir", default="", help="default: a new temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sim-profile", default="cpu-local", help="hardware profile of the sim's prediction"
    )
    parser.add_argument(
        "--sim-only", action="store_true", help="print the sim's predictions, run no cluster"
    )
    parser.add_argument(
        "--probes", type=int, default=3, help="requests sent alone first, to measure overheads"
    )
    args = parser.parse_args()
    model = demo_model()

    requests = trace_workload(
        "azure-code",
        PromptMaker(None, chat=False, seed=args.seed),
        args.seed,
        start=args.trace_start,
        duration=args.trace_duration,
        time_scale=args.time_scale,
        length_scale=args.length_scale,
    )
    n = args.prefill + args.decode
    engine_args = [
        "--num-threads", str(args.threads),
        "--kv-cache-gb", str(args.kv_cache_gb),
        "--max-model-len", "4096",
    ]  # fmt: skip
    log_root = Path(args.log_dir or tempfile.mkdtemp(prefix="xllm-pd-bench-"))
    common = {"host": "127.0.0.1", "log_level": "INFO", "stop_grace": 10.0}
    shapes = {
        "colocated": {"instances": n, "policy": "least-load"},
        "static-pd": {"prefill": args.prefill, "decode": args.decode, "policy": "least-load"},
        "slo-pd": {
            "prefill": args.prefill,
            "decode": args.decode,
            "policy": "slo-pd",
            "slo_ttft": args.slo_ttft / 1e3,
            "slo_tpot": args.slo_tpot / 1e3,
            "min_decode_instances": 1,
            "slo_admission": 1.0,
            "cost_profile": args.sim_profile,
            "cost_model": str(model),
        },
    }
    slo = Slo(args.slo_ttft, args.slo_tpot)
    results, predicted, measured = {}, {}, {}
    probes = probe_requests(requests, args)
    for name in args.configs.split(","):
        if args.sim_only:
            predicted[name] = sim_prediction(args, name, shapes[name], model)
            print(f"== {name}: the sim predicts {predicted[name]}", file=sys.stderr)
            continue
        config = ClusterConfig(
            port=free_port(), log_dir=str(log_root / name), **common, **shapes[name]
        )
        results[name], records = run_config(name, config, engine_args, requests, slo, probes)
        overheads = measured_overheads(name, shapes[name], records, model, args, measured)
        if overheads is not None:
            measured[name] = overheads
            results[name]["overheads"] = dataclasses.asdict(overheads)
        predicted[name] = sim_prediction(args, name, shapes[name], model, overheads)
        print(f"== {name}: the sim predicts {predicted[name]}", file=sys.stderr)
        results[name]["sim"] = predicted[name]
        results[name]["sim_vs_live"] = {
            k: round(predicted[name][k] / results[name][k], 3) if results[name][k] else None
            for k in RATIO_KEYS
        }
    base = results.get("colocated")
    emit(
        {
            "benchmark": "pd_serving",
            "model": "qwen3-tiny-bf16",
            "trace": f"azure-code start={args.trace_start:g}s duration={args.trace_duration:g}s "
            f"time x{args.time_scale:g} length x{args.length_scale:g}",
            "requests": len(requests),
            "input_tokens": sum(r.input_len for r in requests),
            "output_tokens": sum(r.output_len for r in requests),
            "instances": n,
            "shapes": {
                k: f"{n} colocated" if k == "colocated" else f"{args.prefill}P+{args.decode}D"
                for k in results
            },
            "slo_ms": {"ttft": args.slo_ttft, "tpot": args.slo_tpot},
            "results": results,
            "sim": predicted,
            "vs_colocated": {
                k: ratios(v, base) for k, v in results.items() if base and k != "colocated"
            },
        }
    )


if __name__ == "__main__":
    main()
