"""`xllm sim`: replay a trace on a simulated cluster under every placement policy;
`xllm sim calibrate`: fit a hardware profile to our engine on this machine."""

from __future__ import annotations

import argparse
import json
import sys
import time

from xllm.config import FLIP_HYSTERESIS


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sim",
        help="simulate a cluster on a trace with the scheduler's own policies",
        description=__doc__,
    )
    add_run_arguments(p)
    p.set_defaults(func=run)
    sub = p.add_subparsers(dest="sim_command")
    c = sub.add_parser("calibrate", help="time our engine and fit a hardware profile")
    c.add_argument("--model", required=True, help="Hugging Face model folder (or config)")
    c.add_argument("--out", required=True, help="profile JSON to write")
    c.add_argument(
        "--refit",
        action="store_true",
        help="fit --out again from the measurements saved beside it (no measuring)",
    )
    c.add_argument("--dtype", default="bfloat16")
    c.add_argument("--grid", choices=("small", "tiny"), default="small", help="shape grid")
    c.add_argument("--rounds", type=int, default=3, help="visits of every shape, interleaved")
    c.add_argument("--repeats", type=int, default=1, help="timed steps per visit")
    c.add_argument("--warmup", type=int, default=0, help="untimed steps per visit")
    c.add_argument("--name", default="cpu-local")
    c.set_defaults(func=run_calibrate)
    w = sub.add_parser(
        "sweep",
        help="load x instance count x arm: goodput and SLO attainment, table, JSON and plot",
        description="Replay the trace at each time scale on each instance count under each "
        "arm (colocated / disaggregated least-load, slo-pd; see services/scheduler/sim/sweep.py).",
    )
    add_run_arguments(w)
    w.add_argument("--time-scales", required=True, help="comma-separated time scales, the loads")
    w.add_argument(
        "--arms",
        default="colocated,disaggregated,slo-pd",
        help="comma-separated, of: colocated, disaggregated, slo-pd, colocated+admission",
    )
    w.add_argument("--out", default="", help="path prefix for the .md, .json and .png written")
    w.set_defaults(func=run_sweep)
    from services.scheduler.sim import epd_tool

    epd_tool.add_parser(sub)


def run_sweep(args: argparse.Namespace) -> int:
    from services.scheduler.sim import sweep

    return sweep.run(args)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a run (`xllm sim`), shared by `xllm sim sweep`."""
    p.add_argument(
        "--trace", default="azure-code", help="trace name or file (xllm.cli.bench.traces)"
    )
    p.add_argument(
        "--instances", default="16", help="PD-colocated instances; a list (8,16,32) sweeps"
    )
    p.add_argument("--pd", default="", help="P:D prefill and decode instances instead")
    p.add_argument(
        "--policy",
        default="all",
        help="policy names (comma-separated), or `all` (every one in POLICIES)",
    )
    p.add_argument("--profile", default="cpu-local", help="hardware profile name or JSON file")
    p.add_argument(
        "--model-config", default="qwen3-0.6b", help="model folder, config.json or built-in name"
    )
    p.add_argument("--dtype", default=None, help="weights/KV dtype (default: the config's)")
    p.add_argument("--slo-ttft", type=float, help="TTFT target, seconds (required)")
    p.add_argument("--slo-tpot", type=float, help="TPOT target, seconds (required)")
    p.add_argument("--time-scale", type=float, default=1.0, help="multiplies inter-arrival times")
    p.add_argument("--length-scale", type=float, default=1.0, help="multiplies lengths")
    p.add_argument("--start", type=float, default=0.0, help="trace window start, seconds")
    p.add_argument("--duration", type=float, default=None, help="trace window, seconds")
    p.add_argument("--limit", type=int, default=None, help="first N requests")
    engine = "the simulated engine's, as EngineConfig's"
    p.add_argument("--block-size", type=int, default=16, help=f"{engine} --block-size")
    p.add_argument("--max-num-seqs", type=int, default=64, help=f"{engine} --max-num-seqs")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help=f"{engine} step token budget"
    )
    p.add_argument(
        "--kv-cache-gb", type=float, default=0.0, help="KV pool per instance; 0 = the profile's"
    )
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument(
        "--host-kv-gb", type=float, default=0.0, help=f"{engine} --host-kv-gb: host KV tier"
    )
    p.add_argument(
        "--kv-store", action="store_true", help="instances share a cluster KV store (Mooncake)"
    )
    p.add_argument(
        "--heartbeat-interval", type=float, default=0.25, help="seconds between heartbeats"
    )
    live = "measured serving overhead (sim/serving.py; benchmarks/pd_serving.py measures it)"
    p.add_argument(
        "--request-overhead", type=float, default=0.0, help=f"{live}: seconds per request"
    )
    p.add_argument(
        "--prefill-hop", type=float, default=0.0, help=f"{live}: seconds more per split request"
    )
    p.add_argument(
        "--handoff-overhead", type=float, default=0.0, help=f"{live}: seconds per KV handoff"
    )
    p.add_argument("--step-overhead", type=float, default=0.0, help=f"{live}: seconds per step")
    p.add_argument(
        "--cores", type=int, default=0, help="CPU cores the instances share (0 = a device each)"
    )
    flips = "the scheduler's, for policies that flip roles (slo-pd)"
    p.add_argument(
        "--min-decode-instances", type=int, default=2, help=f"{flips}: decode instances kept"
    )
    p.add_argument(
        "--flip-cooldown",
        type=float,
        default=0.0,
        help=f"{flips}: seconds a role is kept, at least",
    )
    p.add_argument(
        "--flip-idle",
        type=float,
        default=0.0,
        help=f"{flips}: idle seconds before P -> D, at least",
    )
    p.add_argument(
        "--flip-hysteresis",
        type=float,
        default=FLIP_HYSTERESIS,
        help=f"{flips}: cooldown and idle time in predicted service times",
    )
    p.add_argument(
        "--slo-admission",
        type=float,
        default=0.0,
        help="the scheduler's: refuse requests predicted past this x --slo-ttft (0 = admit all)",
    )
    offline = "offline backlog (priority 1) beside the trace"
    p.add_argument("--offline-backlog", type=int, default=0, help=f"{offline}: requests (0 = none)")
    p.add_argument(
        "--offline-input-len", type=int, default=0, help=f"{offline}: prompt tokens (0 = ShareGPT)"
    )
    p.add_argument(
        "--offline-output-len", default="256", help=f"{offline}: output tokens, N or LO:HI"
    )
    p.add_argument(
        "--offline-concurrency",
        type=int,
        default=64,
        help=f"{offline}: requests in flight at once, as offline workers submit (0 = all)",
    )


def run(args: argparse.Namespace) -> int:
    from services.scheduler.policies import POLICIES, get_policy
    from services.scheduler.sim import run as sim_run

    if args.slo_ttft is None or args.slo_tpot is None:
        print("error: give --slo-ttft and --slo-tpot", file=sys.stderr)
        return 2
    try:
        names = list(POLICIES) if args.policy == "all" else args.policy.split(",")
        for name in names:
            get_policy(name)
        counts = [int(n) for n in str(args.instances).split(",")]
        setups = [sim_run.setup_from_args(args, n) for n in counts]
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from services.scheduler.sim.report import markdown_table

    reports = []
    for setup in setups:
        for name in names:
            start = time.perf_counter()
            reports.append(sim_run.simulate(setup, name))
            elapsed = time.perf_counter() - start
            print(f"{name} x{setup.num_instances}: simulated in {elapsed:.1f} s", file=sys.stderr)
    print(setups[0].describe())
    print(markdown_table(reports))
    results = [r.as_dict() for r in reports]
    print(json.dumps({"setup": setups[0].as_dict(), "results": results}))
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.scheduler.cost_model import load_model_config
    from services.scheduler.sim import calibrate as cal
    from services.scheduler.sim import fit

    if args.refit:
        profile = fit.refit(args.out, load_model_config(args.model, args.dtype))
        print(json.dumps({"profile": args.out, **profile.fit}))
        return 0
    train, held_out = (
        (cal.TRAIN_SMALL, cal.HELD_OUT_SMALL)
        if args.grid == "small"
        else (cal.TRAIN_TINY, cal.HELD_OUT_TINY)
    )
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    profile, train_data, test_data = cal.calibrate(
        args.model,
        args.dtype,
        train,
        held_out,
        rounds=args.rounds,
        repeats=args.repeats,
        warmup=args.warmup,
        name=args.name,
        log=log,
    )
    profile.save(args.out)
    measurements = Path(args.out).with_suffix(".measurements.jsonl")
    model = load_model_config(args.model, args.dtype)
    fit.save_measurements(measurements, train_data, test_data, profile, model)
    print(json.dumps({"profile": args.out, "measurements": str(measurements), **profile.fit}))
    return 0
