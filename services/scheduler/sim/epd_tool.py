"""`xllm sim profile-epd`: measure a multimodal model for EPD, then pick the disaggregation
strategy for a workload by simulating every topology of `--instances` with those costs.

    xllm sim profile-epd --model DIR [--tpot-slo MS] [--ttft-slo MS] [--workload coco]
                         [--instances 3] [--requests 64] [--concurrency 8] [--out PREFIX]

1. Profile (epd_measure.py, the real engine in this process; or `--profile FILE` from an
   earlier `--out`): the step of a `--decode-batch` decode batch, the largest encode batch
   and prefill token budget that keep a step within the TPOT SLO, the tower's cost per image
   size, the embedding bytes, a fitted cost profile of the language model's steps, what
   a NATS message and a Mooncake read cost here, and the cores the processes will share;
   with `--calibrate URL` (a live `xllm up` cluster here), the serving path's CPU outside
   the steps, measured on it (epd_serving_cpu.py).
2. The workload: COCO val2017 image sizes x `--image-scale` (epd_workload.py), `--requests`
   of them sent `--concurrency` at a time (closed loop, as benchmarks/epd_serving.py
   sends them), or at `--rate` req/s (Poisson) when given.
3. Every candidate (epd_choice.py) simulated on it (its processes sharing `--cores`, its
   requests' trips between them at the measured costs); the best goodput chosen, with a table of
   every candidate and one JSON line: the choice, its `xllm up` flags, its reasons, the
   profile's budgets (`--max-encode-batch`, `--max-encode-tokens` for the engines).

Defaults when not given: TPOT SLO = 4 x the decode batch's step alone, TTFT SLO = 10 x the
TPOT SLO.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

# The parser is built for every `xllm sim` (and `xllm --help`): the simulator, the engine
# and torch are imported only by the functions that run.
if TYPE_CHECKING:
    from services.scheduler.sim.epd_profile import EpdProfile
    from services.scheduler.sim.report import Slo
    from xllm.hardware import HardwareProfile
    from xllm.image_processor import ImageProcessorConfig

KINDS = "EPD,E+PD,EP+D,ED+P,E+P+D"
"""`epd_choice.KINDS`, spelled out here so that building the parser imports nothing."""

PREDICTED = ("goodput_rps", "slo_attainment", "throughput_rps", "ttft_p50", "ttft_p99",
             "tpot_p50", "tpot_p99", "util_mean")  # fmt: skip
"""The simulator's figures given for every candidate."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "profile-epd",
        help="measure a multimodal model's encode/prefill/decode costs and pick the EPD topology",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e.add_argument("--model", required=True, help="a Qwen2-VL model folder")
    e.add_argument("--dtype", default="float32")
    e.add_argument("--tpot-slo", type=float, default=0.0, help="ms; 0 = 4 x the decode step")
    e.add_argument("--ttft-slo", type=float, default=0.0, help="ms; 0 = 10 x the TPOT SLO")
    e.add_argument("--workload", choices=("coco",), default="coco")
    e.add_argument("--instances", type=int, default=3, help="instances to split, encoders too")
    e.add_argument("--kinds", default=KINDS, help="topologies to consider")
    e.add_argument("--requests", type=int, default=64)
    e.add_argument("--concurrency", type=int, default=8, help="requests in flight (closed loop)")
    e.add_argument("--rate", type=float, default=0.0, help="req/s, open loop instead; 0 = closed")
    e.add_argument("--image-scale", type=float, default=0.25, help="x COCO's image sizes")
    e.add_argument("--repeat", type=float, default=0.25, help="share of repeated images")
    e.add_argument("--max-tokens", type=int, default=16, help="output tokens per request")
    e.add_argument("--decode-batch", type=int, default=8, help="decodes beside the encodes")
    e.add_argument("--policy", default="cache-aware", help="the scheduler's placement policy")
    e.add_argument("--profile", default="", help="an EPD profile JSON (from --out): no measuring")
    e.add_argument("--out", default="", help="path prefix: PREFIX.epd.json, PREFIX.hw.json")
    e.add_argument("--calibrate", default="",
                   help="a running `xllm up` cluster's gateway (http://HOST:PORT/v1) on this "
                   "machine: measure its serving CPU outside the steps (epd_serving_cpu.py) "
                   "into the profile; '' = the profile's (none when measured here)")  # fmt: skip
    e.add_argument("--cores", type=int, default=0,
                   help="cores the deployment's processes share; 0 = the profile's (measured)")  # fmt: skip
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=run)


def measure(args: argparse.Namespace, processor: ImageProcessorConfig, workload, log):
    """The EPD profile and the language model's fitted cost profile, measured now."""
    from services.scheduler.sim.epd_measure import profile_epd
    from services.scheduler.sim.epd_workload import median_image_tokens

    median = median_image_tokens(workload)
    by_tokens = sorted(workload, key=lambda r: r.image_tokens)
    mid = next(r for r in by_tokens if r.image_tokens == median)
    sizes = [(mid.height, mid.width)]
    for q in (0.0, 0.99):  # the smallest and the p99 image sizes, for the cost's line
        r = by_tokens[int(q * (len(by_tokens) - 1))]
        if (r.height, r.width) not in sizes:
            sizes.append((r.height, r.width))
    return profile_epd(
        args.model, sizes, args.tpot_slo / 1e3, decode_batch=args.decode_batch,
        decode_ctx=max(64, mid.num_prompt_tokens + args.max_tokens), dtype=args.dtype, log=log,
        cores=getattr(args, "cores", 0),
    )  # fmt: skip


def choose_topology(
    workload, model_dir: str, hw: HardwareProfile, profile: EpdProfile, slo: Slo,
    instances: int, kinds: tuple[str, ...], policy: str = "cache-aware", concurrency: int = 0,
    cores: int = 0,
) -> dict:  # fmt: skip
    """Simulate every candidate on `workload` (closed loop with `concurrency` > 0), its
    processes sharing `cores` (0: the profile's); the choice, the reports and the reasons."""
    from services.scheduler.cost_model import load_model_config
    from services.scheduler.sim.epd_choice import candidates, choose, instance_spec, simulate
    from services.scheduler.sim.report import markdown_table

    spec = instance_spec(load_model_config(model_dir), hw)
    tops = candidates(instances, kinds)

    def run(t):
        return simulate(t, workload, model_dir, hw, profile, slo, spec, policy,
                        concurrency=concurrency, cores=cores or None)  # fmt: skip

    runs = [run(t) for t in tops]
    reports = [r for r, _ in runs]
    best, reasons = choose(reports, [t.kind for t in tops])
    return {
        "choice": tops[best].label,
        "kind": tops[best].kind,
        "cluster_options": tops[best].cluster_options(),
        "reasons": reasons,
        "table": markdown_table(reports),
        "candidates": [
            {"topology": t.label, "cluster_options": t.cluster_options(), "encoders": enc}
            | {k: getattr(r, k) for k in PREDICTED}
            for t, (r, enc) in zip(tops, runs, strict=True)
        ],
    }


def run(args: argparse.Namespace) -> int:
    from services.scheduler.sim.epd_choice import KINDS as ALL_KINDS
    from services.scheduler.sim.epd_profile import EpdProfile
    from services.scheduler.sim.epd_workload import coco_workload
    from services.scheduler.sim.report import Slo
    from xllm.hardware import HardwareProfile
    from xllm.image_processor import ImageProcessorConfig

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", file=sys.stderr, flush=True)

    processor = ImageProcessorConfig.from_dir(args.model)
    if processor is None:
        print(f"error: {args.model} takes no images", file=sys.stderr)
        return 2
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if unknown := set(kinds) - set(ALL_KINDS):
        print(f"error: unknown --kinds {sorted(unknown)}; of {KINDS}", file=sys.stderr)
        return 2

    def workload_at(rate: float):
        return coco_workload(args.requests, rate, processor, args.image_scale, args.repeat,
                             args.max_tokens, args.seed)  # fmt: skip

    if args.profile:
        profile = EpdProfile.load(args.profile)
        hw = HardwareProfile.from_json(profile.hardware_profile)
    else:
        profile, hw = measure(args, processor, workload_at(0.0), log)
    if args.calibrate:
        from services.scheduler.sim.epd_serving_cpu import calibrate_gateway

        mid = sorted(workload_at(0.0), key=lambda r: r.height * r.width)[args.requests // 2]
        cpu = calibrate_gateway(args.calibrate, mid.height, mid.width, log=log)
        profile = replace(profile, serving_cpu=cpu)
    if args.out:
        hw_path = Path(f"{args.out}.hw.json")
        hw.save(hw_path)
        profile = replace(profile, hardware_profile=str(hw_path))
        profile.save(f"{args.out}.epd.json")
    tpot, hops = profile.tpot_slo, profile.hops
    slo = Slo(ttft=args.ttft_slo / 1e3 if args.ttft_slo else 10 * tpot, tpot=tpot)
    how = f"at {args.rate} req/s" if args.rate else f"{args.concurrency} at a time"
    log(f"workload: {args.requests} COCO image requests {how}; simulating")
    concurrency = 0 if args.rate else args.concurrency
    result = choose_topology(workload_at(args.rate), args.model, hw, profile, slo,
                             args.instances, kinds, args.policy, concurrency, args.cores)  # fmt: skip
    print(f"EPD profile of {profile.model}: TPOT SLO {tpot * 1e3:.1f} ms; decode "
          f"{profile.decode_batch} alone {profile.decode_step * 1e3:.1f} ms; max encode batch "
          f"{profile.max_encode_batch} images of {profile.image_tokens} tokens; prefill budget "
          f"{profile.max_prefill_tokens} tokens; NATS round trip {hops.nats_rtt * 1e3:.2f} ms; "
          f"Mooncake read {hops.transfer_latency * 1e3:.2f} ms + "
          f"{hops.transfer_bw / 1e9:.2f} GB/s; {args.cores or profile.cores or 'a core per process'}"
          " cores shared")  # fmt: skip
    print(result.pop("table"))
    print("\n".join(result["reasons"]))
    print(json.dumps({
        "choice": result["choice"], "kind": result["kind"],
        "cluster_options": result["cluster_options"], "workload": how,
        "slo": {"ttft": slo.ttft, "tpot": slo.tpot},
        "engine_flags": {"max_encode_batch": profile.max_encode_batch,
                         "max_encode_tokens": profile.max_encode_tokens,
                         "max_prefill_tokens": profile.max_prefill_tokens},
        "hops": dataclasses.asdict(hops), "cores": args.cores or profile.cores,
        "serving_cpu": dataclasses.asdict(profile.serving_cpu),
        "reasons": result["reasons"], "candidates": result["candidates"],
    }))  # fmt: skip
    return 0
