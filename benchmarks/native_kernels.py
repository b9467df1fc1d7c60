"""Native CPU kernels on vs off: the linear against the memory roofline, and the engine.

    PYTHONPATH=shared:. .venv/bin/python benchmarks/native_kernels.py [--streams 16]

In one run, on whatever kernels this CPU gets (AMX, AVX512-BF16 or AVX2 + FMA):

  * roofline: the machine's read bandwidth (a float32 sum over 1 GiB, best of 5);
  * linear: batch-1 GB/s of the native linear and of torch's F.linear on the `small` model's
    weight shapes (enough copies of each weight to stream from memory, not cache), and the
    native / torch speed ratio at 16 and 128 rows;
  * engine: the `small` demo model (Qwen3-0.6B's shapes, bf16) with `native_kernels` on and
    off, each in its own process (the switch holds for a process's life), alternated:
    batch-1 decode ms/step (median) and its share of the roofline (bytes of weights a step
    reads / bandwidth), and 16 streams' output tok/s and decode ms/step.

Prints one JSON line with all of it. Takes ~4 minutes on 2 quiet AVX2 cores (most of it the
torch-only engine); `--linear-only` skips the engine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from common import demo_model, emit, random_prompts

# The small model's linears (N x K): q|k|v, o, gate|up, down, lm_head (tied embeddings).
SHAPES = [(4096, 1024), (1024, 2048), (6144, 1024), (1024, 3072), (151936, 1024)]


def best_of(calls: list, repeats: int) -> float:
    """Seconds per call: the best of `repeats` rounds through all of `calls`, after one."""
    best = float("inf")
    for round_ in range(repeats + 1):
        start = time.perf_counter()
        for call in calls:
            call()
        if round_:
            best = min(best, time.perf_counter() - start)
    return best / len(calls)


def read_bandwidth() -> float:
    """GB/s of a float32 sum over 1 GiB: a STREAM-like read on all threads."""
    a = torch.ones(1 << 28, dtype=torch.float32)
    return a.numel() * 4 / best_of([a.sum], 5) / 1e9


def bench_linear() -> list[dict]:
    from xllm.ops import fast_linear, pack_weight

    rows_out = []
    for n, k in SHAPES:
        # Copies summing to >= 256 MB, cycled: each call reads its weight from memory.
        copies = max(1, (256 << 20) // (n * k * 2))
        weights = [(torch.randn(n, k) / 32).bfloat16() for _ in range(copies)]
        packed = [pack_weight(w) for w in weights]
        if packed[0] is None:
            return []  # no native linear on this machine
        row = {"shape": f"{n}x{k}"}
        x = torch.randn(1, k).bfloat16()
        native = best_of(
            [partial(fast_linear, x, w, None, p) for w, p in zip(weights, packed, strict=True)], 3
        )
        ref = best_of([partial(F.linear, x, w) for w in weights], 3)
        row["native_gbs_b1"] = round(n * k * 2 / native / 1e9, 1)
        row["torch_gbs_b1"] = round(n * k * 2 / ref / 1e9, 1)
        for rows in (16, 128):
            x = torch.randn(rows, k).bfloat16()
            native = best_of([partial(fast_linear, x, weights[0], None, packed[0])], 3)
            ref = best_of([partial(F.linear, x, weights[0])], 1)
            row[f"ratio_b{rows}"] = round(ref / native, 2)
        rows_out.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    return rows_out


def engine_child(native: bool, args, graph_mode: bool = False) -> dict:
    """One variant, in this process: batch-1 decode steps, then `streams` at once
    (graph_mode.py runs it with --graph-mode off and on)."""
    from xllm.config import EngineConfig
    from xllm.engine.engine import Engine
    from xllm.protocol.types import SamplingParams

    model_dir = demo_model("qwen3", getattr(args, "size", "small"))  # (tiny: smoke runs)
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype="bfloat16",
            native_kernels=native,
            graph_mode=graph_mode,
            max_num_seqs=args.streams,
            kv_cache_gb=1.0,
        )
    )
    weight_bytes = sum(
        m.weight.numel() * m.weight.element_size()
        for m in engine.runner.model.modules()
        if type(m).__name__ == "Linear"
    )
    prompts = random_prompts(
        args.streams + 1, args.prompt_len, engine.model_config.vocab_size, seed=1
    )

    def run(batch: list[list[int]], tag: str) -> tuple[list[float], float, int]:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(batch):
            engine.add_request(f"{tag}{i}", prompt, params)
        steps, generated, start = [], 0, time.perf_counter()
        while engine.has_unfinished():
            t0 = time.perf_counter()
            outputs = engine.step()
            steps.append(time.perf_counter() - t0)
            generated += sum(len(o.token_ids) for o in outputs)
        return steps, time.perf_counter() - start, generated

    run([prompts[-1][:16]], "warmup")
    steps, _, _ = run([prompts[0]], "b1-")
    decode = steps[1:]  # the first step is the prompt's prefill
    streams_steps, seconds, generated = run(prompts[1 : args.streams + 1], "s-")
    return {
        "weight_bytes": weight_bytes,
        "b1_decode_ms": round(statistics.median(decode) * 1e3, 2),
        "streams_tok_s": round(generated / seconds, 1),
        "streams_decode_ms": round(
            statistics.median(streams_steps[-args.output_len // 2 :]) * 1e3, 1
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--linear-only", action="store_true")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(engine_child(args.child == "on", args)), flush=True)
        return

    from xllm.ops import kernels

    native = kernels()
    if native is None:
        path = "none"
    elif native.has_amx():
        path = "amx"
    elif native.has_bf16_linear():
        path = "avx512-bf16"
    else:
        path = "avx2" if native.has_avx2_linear() else "attention and norm only"
    bandwidth = read_bandwidth()
    result = {
        "kernels": path,
        "threads": torch.get_num_threads(),
        "read_gbs": round(bandwidth, 1),
        "load_before": os.getloadavg()[0],
        "linear": bench_linear(),
    }
    if not args.linear_only:
        demo_model("qwen3", "small")  # made once, before the timed children
        child = [
            sys.executable,
            __file__,
            "--streams",
            str(args.streams),
            "--prompt-len",
            str(args.prompt_len),
            "--output-len",
            str(args.output_len),
            "--child",
        ]
        for variant in ("on", "off"):
            out = subprocess.run(child + [variant], check=True, capture_output=True, text=True)
            result[f"engine_{variant}"] = json.loads(out.stdout.strip().splitlines()[-1])
            print(json.dumps({variant: result[f"engine_{variant}"]}), file=sys.stderr, flush=True)
        on, off = result["engine_on"], result["engine_off"]
        roofline_ms = on["weight_bytes"] / (bandwidth * 1e9) * 1e3
        result["b1_roofline_ms"] = round(roofline_ms, 2)
        result["b1_share_of_roofline"] = round(roofline_ms / on["b1_decode_ms"], 3)
        result["b1_speedup"] = round(off["b1_decode_ms"] / on["b1_decode_ms"], 2)
        result["streams_speedup"] = round(on["streams_tok_s"] / off["streams_tok_s"], 2)
    result["load_after"] = os.getloadavg()[0]
    emit(result)


if __name__ == "__main__":
    main()
