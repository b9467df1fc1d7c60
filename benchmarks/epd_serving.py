"""Hybrid EPD, live: EPD colocated vs E+PD, the same image requests, one run.

Image chats shaped like COCO val2017 (`../shared/data/coco_captions_val2017.json.gz`: each
request one synthetic noise image of a listed image's size x `--image-scale`, the caption
prompt "Describe the image."), `--repeat` of them sharing an image with an earlier one
(what the encoder's cache saves), sent `--concurrency` at a time (closed loop, streaming,
exact output lengths) to two clusters of the Qwen2-VL checkpoint, one after the other:

  * colocated:  `--instances N` (each instance runs the vision tower in its steps);
  * e+pd:       `--instances N --encode E` (the tower on the encoder; embeddings by Mooncake).

    .venv/bin/python benchmarks/epd_serving.py [--model DIR] [--requests 64 --concurrency 8]

Prints one JSON line: per configuration TTFT and TPOT p50/p99 (ms), throughput (req/s),
failures, and (e+pd) the encoder's batches, mean batch latency, cache hit rate and the
embedding bytes handed out / read. A table per configuration goes to stderr. Without
`--model`, the tiny Qwen2-VL (float32) is made once under ~/.cache/xllm/models.
"""

from __future__ import annotations

import argparse
import base64
import gzip
import json
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
from common import demo_model, emit

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.engine.multimodal import random_image_bytes

COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco_captions_val2017.json.gz"


def coco_images(n: int, repeat: float, scale: float, seed: int) -> list[bytes]:
    """`n` PNGs in COCO's image sizes x `scale`; a `repeat` share reuse an earlier one."""
    with gzip.open(COCO) as f:
        sizes = [(i["height"], i["width"]) for i in json.load(f)["images"]]
    rng = random.Random(seed)
    images: list[bytes] = []
    for k in range(n):
        if images and rng.random() < repeat:
            images.append(rng.choice(images))
            continue
        h, w = rng.choice(sizes)
        images.append(random_image_bytes(max(28, int(h * scale)), max(28, int(w * scale)), k))
    return images


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


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def run_config(name: str, config: ClusterConfig, engine_args, images, args) -> dict:
    print(f"== {name}: logs in {config.log_dir}", file=sys.stderr)
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
        model = client.models.list().data[0].id
        one_request(client, model, random_image_bytes(56, 56, seed=-1 % 2**32), 2)  # warm-up
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="", help="a Qwen2-VL folder; default: tiny, made once")
    parser.add_argument("--instances", type=int, default=1)
    parser.add_argument("--encode", type=int, default=1)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeat", type=float, default=0.25, help="share of repeated images")
    parser.add_argument("--image-scale", type=float, default=0.25, help="x COCO's sizes")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--log-dir", default="", help="default: a new temporary folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model = Path(args.model) if args.model else demo_model("qwen2-vl", "tiny", dtype="float32")
    images = coco_images(args.requests, args.repeat, args.image_scale, args.seed)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="xllm-epd-"))
    engine_args = ["--dtype", args.dtype]
    shapes = {"colocated": {}, "e+pd": {"encode": args.encode}}
    results = {}
    for name, shape in shapes.items():
        config = ClusterConfig(
            model=str(model), host="127.0.0.1", port=free_port(), instances=args.instances,
            log_dir=str(log_dir / name), stop_grace=5, **shape,
        )  # fmt: skip
        results[name] = run_config(name, config, engine_args, images, args)
    emit({"benchmark": "epd_serving", "requests": args.requests, "concurrency": args.concurrency,
          "image_scale": args.image_scale, "repeat": args.repeat, "results": results})  # fmt: skip


if __name__ == "__main__":
    main()
