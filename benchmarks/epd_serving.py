"""Hybrid EPD, live: EPD colocated vs the EPD profiler's choice vs one fixed alternative.

One run, three arms on the same image chats, the profiler first:

  1. the EPD profiler in this process (`xllm sim profile-epd`'s code, or `--profile FILE`
     from its `--out`): the decode step, the max encode batch and prefill budget under the
     TPOT SLO, the tower's cost per image size; then the simulator picks the topology of
     `--instances` processes (encoders count) for this workload among what `xllm up` can
     deploy here (ED+P only where `--encode-on` exists), printing its predicted goodput,
     TTFT and TPOT per candidate and its reasons;
  2. three clusters of the Qwen2-VL checkpoint, one after the other: `colocated` (EPD,
     `--instances N`) first, which, once warm, is also where the serving path's CPU outside
     the steps is measured (`epd_serving_cpu.py`: two bursts of `--calibrate-requests`
     fresh requests, one at a time) before the simulator chooses (so the choice charges
     it); then `chosen` (the profiler's; skipped when it is EPD itself) and `fixed`
     (E+P+D 1E:1P:(N-2)D, or E+PD 1E:(N-1)PD when that is the choice or N < 3); the
     engines get `--max-encode-batch/--max-encode-tokens` from the profile where those
     flags exist.

Requests: image chats shaped like COCO val2017 (`../shared/data/coco_captions_val2017.json.gz`,
services/scheduler/sim/epd_workload.py: one synthetic noise image of a listed image's size x
`--image-scale`, a `--repeat` share reusing an earlier image, "Describe the image.",
`--max-tokens` exact output tokens), sent `--concurrency` at a time (closed loop, streamed),
as the profiler simulated them.

    .venv/bin/python benchmarks/epd_serving.py [--model DIR] [--requests 64 --concurrency 8]

Prints one JSON line: the profiler's choice, reasons and predictions, and per arm TTFT and
TPOT p50/p99 (ms), throughput (req/s), failures, and (with encoders) the encoders' batches,
mean batch latency, cache hit rate and the embedding bytes handed out / read. Tables go to
stderr. Without `--model`, the tiny Qwen2-VL (float32) with a wider vision tower (`--tower
wide`, WIDE_TOWER) or its own (`--tower tiny`) is made once under ~/.cache/xllm/models.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from common import demo_model, emit

from services.scheduler.sim.epd_choice import KINDS, Topology
from services.scheduler.sim.epd_profile import EpdProfile
from services.scheduler.sim.epd_serving_cpu import calibrate
from services.scheduler.sim.epd_tool import choose_topology, measure
from services.scheduler.sim.epd_workload import ImageRequest, coco_workload
from services.scheduler.sim.report import Slo
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.config import EngineConfig
from xllm.engine.multimodal import random_image_bytes
from xllm.hardware import HardwareProfile
from xllm.image_processor import ImageProcessorConfig

WIDE_TOWER = {"depth": 4, "embed_dim": 128, "num_heads": 4}
"""`--tower wide`: the tiny model's tower made 4 blocks of width 128, so that a vision token
(4 patches) costs the tower about 4x what it costs the tiny language model, near Qwen2-VL-2B's
ratio (a 675M tower before a 1.5B model); the tiny tower (2 x 64) costs a tenth of it."""


def vl_model(tower: str) -> Path:
    """The tiny Qwen2-VL (float32), with its own tower or the wide one; made once."""
    if tower == "tiny":
        return demo_model("qwen2-vl", "tiny", dtype="float32")
    from unittest import mock

    from common import CACHE

    from xllm.cli.commands import make_vl_model as vl
    from xllm.cli.commands.make_model import make_model

    out = CACHE / "qwen2-vl-tiny-widetower-float32-seed0"
    if not (out / "config.json").is_file():
        print(f"making {out} (once)...", file=sys.stderr)
        tiny = vl.vision_config
        with mock.patch.object(vl, "vision_config", lambda s, h: tiny(s, h) | WIDE_TOWER):
            make_model("qwen2-vl", "tiny", out, dtype="float32")
    return out


def images_of(workload: list[ImageRequest]) -> list[bytes]:
    """Each request's PNG: noise of its size, the same bytes for the same image id."""
    made: dict[int, bytes] = {}
    for r in workload:
        if r.image_id not in made:
            made[r.image_id] = random_image_bytes(r.height, r.width, seed=r.image_id)
    return [made[r.image_id] for r in workload]


def one_request(client, model: str, image: bytes, max_tokens: int) -> tuple[float, float]:
    """(TTFT, TPOT) in seconds of one streamed image chat."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0, stream=True,
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe the image."}]}],
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    times = [
        time.perf_counter() for chunk in stream if chunk.choices and chunk.choices[0].delta.content
    ]
    ttft = times[0] - start
    return ttft, (times[-1] - times[0]) / max(1, len(times) - 1)


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def run_config(
    name: str, config: ClusterConfig, engine_args, images, args, on_ready=None
) -> dict:  # fmt: skip
    """One arm's figures; `on_ready(cluster, client, model)` first, once it is warm."""
    print(f"== {name}: logs in {config.log_dir}", file=sys.stderr)
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        warm = [random_image_bytes(56, 56, seed=2**31 + i) for i in range(config.num_instances)]
        with ThreadPoolExecutor(len(warm)) as pool:  # every instance's first steps are slow
            list(pool.map(lambda im: one_request(client, model, im, 2), warm))
        if on_ready is not None:
            on_ready(cluster, client, model)
        failures = 0
        results = []
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [
                pool.submit(one_request, client, model, im, args.max_tokens) for im in images
            ]
            for f in futures:
                try:
                    results.append(f.result(timeout=600))
                except Exception as e:  # counted, not fatal: the figures say how many
                    failures += 1
                    print(f"{name}: request failed: {e!r}", file=sys.stderr)
        duration = time.perf_counter() - start
        time.sleep(1.0)  # a few heartbeats: the counters of the last requests
        url = config.base_url.removesuffix("/v1") + "/cluster"
        instances = json.load(urllib.request.urlopen(url, timeout=10))["instances"]
    ttft, tpot = [1e3 * r[0] for r in results], [1e3 * r[1] for r in results]
    out = {
        "ttft_p50_ms": round(pct(ttft, 50), 1), "ttft_p99_ms": round(pct(ttft, 99), 1),
        "tpot_p50_ms": round(pct(tpot, 50), 2), "tpot_p99_ms": round(pct(tpot, 99), 2),
        "throughput_req_s": round(len(results) / duration, 3), "failed": failures,
        "duration_s": round(duration, 2),
    }  # fmt: skip
    encoders = [i["encoder"] for i in instances if i["role"] == "encode"]
    if encoders:
        batches = sum(e["batches"] for e in encoders)
        queries = sum(e["cache_queries"] for e in encoders)
        out |= {
            "encode_batches": batches,
            "encode_batch_mean_ms": round(1e3 * sum(e["encode_seconds"] for e in encoders) / max(1, batches), 1),
            "images_encoded": sum(e["images_encoded"] for e in encoders),
            "embedding_cache_hit_rate": round(sum(e["cache_hits"] for e in encoders) / max(1, queries), 3),
            "embedding_bytes_published": sum(e["bytes_published"] for e in encoders),
            "embedding_bytes_fetched": sum(i["encoder"]["bytes_fetched"] for i in instances),
        }  # fmt: skip
    print(json.dumps(out, indent=1), file=sys.stderr)
    return out


def deployable_kinds() -> tuple[str, ...]:
    """What `xllm up` on this checkout deploys: ED+P needs `--encode-on`."""
    fields = {f.name for f in dataclasses.fields(ClusterConfig)}
    return tuple(k for k in KINDS if k != "ED+P" or "encode_on" in fields)


def encode_budget_args(profile: EpdProfile) -> list[str]:
    """The profile's in-instance encode budget, as engine flags, where the engine has them."""
    fields = {f.name for f in dataclasses.fields(EngineConfig)}
    out = []
    if "max_encode_batch" in fields and profile.max_encode_batch > 0:
        out += ["--max-encode-batch", str(profile.max_encode_batch)]
    if "max_encode_tokens" in fields and profile.max_encode_tokens > 0:
        out += ["--max-encode-tokens", str(profile.max_encode_tokens)]
    return out


def fixed_alternative(n: int, chosen: dict) -> Topology:
    full = Topology("E+P+D", encode=1, prefill=1, decode=n - 2)
    if n >= 3 and full.cluster_options() != chosen:
        return full
    return Topology("E+PD", encode=1, both=n - 1)


def log(msg: str) -> None:
    print(f"[profiler {time.perf_counter() - T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.perf_counter()


def profile_of(args, model: Path, processor: ImageProcessorConfig, workload):
    """(EPD profile, hardware profile): measured here, or `--profile`'s."""
    if args.profile:
        profile = EpdProfile.load(args.profile)
        hw = HardwareProfile.from_json(profile.hardware_profile)
    else:
        margs = argparse.Namespace(model=str(model), tpot_slo=args.tpot_slo, dtype=args.dtype,
                                   decode_batch=args.concurrency, max_tokens=args.max_tokens,
                                   cores=args.cores)  # fmt: skip
        profile, hw = measure(margs, processor, workload, log)
    return profile, hw


def calibrate_on(cluster, client, model: str, config: ClusterConfig, workload, args):
    """The serving path's CPU outside the steps, from bursts on this live cluster (one
    request at a time, fresh images of the workload's median size)."""
    mid = sorted(workload, key=lambda r: r.height * r.width)[len(workload) // 2]

    def burst(n: int, tokens: int, seed: int) -> None:
        for i in range(n):
            image = random_image_bytes(mid.height, mid.width, seed=2**30 + 1000 * seed + i)
            one_request(client, model, image, tokens)

    url = config.base_url.removesuffix("/v1") + "/cluster"
    return calibrate(cluster.process_states, url, burst, args.calibrate_requests, log=log)


def profiler(args, model: str, profile: EpdProfile, hw, workload) -> dict:
    """The simulator's choice of topology for `workload` on `profile`."""
    tpot = profile.tpot_slo
    slo = Slo(ttft=args.ttft_slo / 1e3 if args.ttft_slo else 10 * tpot, tpot=tpot)
    result = choose_topology(workload, model, hw, profile, slo, args.instances,
                             deployable_kinds(), concurrency=args.concurrency,
                             cores=args.cores)  # fmt: skip
    print(result.pop("table"), file=sys.stderr)
    print("\n".join(result["reasons"]), file=sys.stderr)
    result["slo_ms"] = {"ttft": round(slo.ttft * 1e3, 2), "tpot": round(tpot * 1e3, 2)}
    result["profile"] = {k: getattr(profile, k) for k in (
        "decode_batch", "decode_step", "image_tokens", "max_encode_batch", "max_encode_tokens",
        "max_prefill_tokens")}  # fmt: skip
    result["profile"]["hops"] = dataclasses.asdict(profile.hops)
    result["profile"]["cores"] = args.cores or profile.cores
    result["profile"]["serving_cpu"] = dataclasses.asdict(profile.serving_cpu)
    result["profile_seconds"] = round(time.perf_counter() - T0, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a Qwen2-VL folder; default: --tower's")
    parser.add_argument("--tower", choices=("wide", "tiny"), default="wide",
                        help="without --model: the tiny Qwen2-VL with this vision tower")  # fmt: skip
    parser.add_argument("--instances", type=int, default=3, help="processes per arm, encoders too")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=float, default=0.25, help="share of repeated images")
    parser.add_argument("--image-scale", type=float, default=0.25, help="x COCO's sizes")
    parser.add_argument("--tpot-slo", type=float, default=0.0, help="ms; 0 = the profiler's")
    parser.add_argument("--ttft-slo", type=float, default=0.0, help="ms; 0 = 10 x TPOT SLO")
    parser.add_argument("--profile", default="", help="a saved EPD profile (profile-epd --out)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--cores", type=int, default=0,
                        help="cores the arms' processes share, for the profiler's simulation; "
                        "0 = what this process may use")  # fmt: skip
    parser.add_argument("--calibrate-requests", type=int, default=8,
                        help="requests per burst measuring the serving path's CPU on the "
                        "colocated arm before the choice; 0 = the profile's (or none)")  # fmt: skip
    parser.add_argument("--log-dir", default="", help="default: a new temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = Path(args.model) if args.model else vl_model(args.tower)
    processor = ImageProcessorConfig.from_dir(model)
    workload = coco_workload(args.requests, 0.0, processor, args.image_scale, args.repeat,
                             args.max_tokens, args.seed)  # fmt: skip
    profile, hw = profile_of(args, model, processor, workload)
    images = images_of(workload)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="xllm-epd-"))
    # One torch thread per instance: what the profile measured, and no oversubscription.
    engine_args = ["--dtype", args.dtype, "--num-threads", "1", *encode_budget_args(profile)]

    def config_of(name: str, shape: dict) -> ClusterConfig:
        return ClusterConfig(model=str(model), host="127.0.0.1", port=free_port(),
                             log_dir=str(log_dir / name), stop_grace=5, **shape)  # fmt: skip

    state: dict = {"profile": profile}
    colocated = config_of("colocated", {"instances": args.instances})

    def choose_here(cluster, client, served: str) -> None:
        """On the warm colocated arm: measure its serving CPU, then choose."""
        if args.calibrate_requests > 0:
            cpu = calibrate_on(cluster, client, served, colocated, workload, args)
            state["profile"] = dataclasses.replace(profile, serving_cpu=cpu)
        state["choice"] = profiler(args, str(model), state["profile"], hw, workload)

    results = {"colocated": run_config("colocated", colocated, engine_args, images, args,
                                       on_ready=choose_here)}  # fmt: skip
    choice = state["choice"]
    fixed = fixed_alternative(args.instances, choice["cluster_options"])
    arms = {"chosen": choice["cluster_options"]} if choice["kind"] != "EPD" else {}
    arms["fixed"] = fixed.cluster_options()
    labels = {"colocated": f"EPD {args.instances}PD", "chosen": choice["choice"],
              "fixed": fixed.label}  # fmt: skip
    results["colocated"] = {"topology": labels["colocated"], **results["colocated"]}
    for name, shape in arms.items():
        results[name] = {
            "topology": labels[name],
            **run_config(name, config_of(name, shape), engine_args, images, args),
        }
    emit({"benchmark": "epd_serving", "requests": args.requests, "concurrency": args.concurrency,
          "instances": args.instances, "image_scale": args.image_scale, "repeat": args.repeat,
          "profiler": choice, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
