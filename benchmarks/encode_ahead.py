"""Pending encodes (engine/encode_ahead.py): TTFT and TPOT of image requests with waiting
requests' images encoded ahead of their prefill (`--max-encode-batch` N, default 4) against encoding
each image only in the step whose chunk reaches it (0), the same requests, one run.

`--requests` image chats (one noise image of `--image-size` each, a short question, `--output-len`
tokens, EOS ignored) go to one engine at once; `--max-num-seqs` of them run at a time, so the
rest wait, and prompts are cut into `--chunk` token chunks. Greedy outputs must be identical
across budgets (checked).

    .venv/bin/python benchmarks/encode_ahead.py [--size small --budgets 0,4 --requests 12]

Prints one JSON line: per budget the wall time, TTFT and TPOT p50/p99 (ms), the images
encoded ahead and the tower calls, and the TTFT/TPOT p50 ratios to budget 0.
"""

from __future__ import annotations

import argparse
import time

from common import demo_model, emit

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.engine.multimodal import ImageInput, random_image_bytes
from xllm.protocol.types import SamplingParams
from xllm.tokenizer import Tokenizer


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def run(args, model, budget: int, prompt: list[int], images: list[bytes]) -> tuple[dict, dict]:
    engine = Engine(EngineConfig(
        model=str(model), dtype=args.dtype, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.chunk, max_encode_batch=budget, enable_prefix_caching=False,
    ))  # fmt: skip
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    for i, data in enumerate(images):
        image = ImageInput.from_bytes(data, engine.image_processor)
        engine.add_request(f"r{i}", prompt, params, images=[image])
    tokens: dict[str, list[int]] = {}
    times: dict[str, list[float]] = {}
    while engine.has_unfinished():
        deltas = engine.step()
        now = time.perf_counter() - start
        for delta in deltas:
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            times.setdefault(delta.request_id, []).append(now)
    seconds = time.perf_counter() - start
    ttft = [t[0] for t in times.values()]
    tpot = [(t[-1] - t[0]) / (len(t) - 1) for t in times.values() if len(t) > 1]
    ahead = engine.scheduler.encode_ahead
    tower = engine.runner.tower_stats
    return {
        "max_encode_batch": budget,
        "seconds": round(seconds, 3),
        "ttft_p50_ms": pct(ttft, 0.5), "ttft_p99_ms": pct(ttft, 0.99),
        "tpot_p50_ms": pct(tpot, 0.5), "tpot_p99_ms": pct(tpot, 0.99),
        "encoded_ahead": ahead.num_encoded_ahead if ahead else 0,
        "tower_calls": tower.batches, "images_encoded": tower.images_encoded,
    }, tokens  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", help="small (timed) or tiny (smoke run)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--budgets", default="0,4")
    parser.add_argument("--requests", type=int, default=12)
    parser.add_argument("--image-size", type=int, default=224, help="pixels per side")
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=512, help="max_num_batched_tokens")
    args = parser.parse_args()
    model = demo_model("qwen2-vl", args.size, dtype=args.dtype)
    tokenizer = Tokenizer(model)
    text = tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}],
            }
        ],
        add_generation_prompt=True,
    )
    prompt = tokenizer.encode(text, add_special_tokens=False)
    side = args.image_size
    images = [random_image_bytes(side, side, seed=i) for i in range(args.requests)]
    results, outputs = [], []
    for budget in (int(b) for b in args.budgets.split(",")):
        result, tokens = run(args, model, budget, prompt, images)
        results.append(result)
        outputs.append(tokens)
    assert all(o == outputs[0] for o in outputs), "greedy outputs differ across budgets"
    base = results[0]
    for r in results:
        r["ttft_p50_ratio"] = round(r["ttft_p50_ms"] / base["ttft_p50_ms"], 3)
        r["tpot_p50_ratio"] = round(r["tpot_p50_ms"] / max(base["tpot_p50_ms"], 1e-9), 3)
    emit({"benchmark": "encode_ahead", "size": args.size, "requests": args.requests,
          "image_size": side, "results": results, "identical_outputs": True})  # fmt: skip


if __name__ == "__main__":
    main()
