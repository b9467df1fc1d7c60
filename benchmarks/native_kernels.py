"""Native CPU kernels on vs off: the linear against the memory roofline, and the engine.

    PYTHONPATH=shared:. .venv/bin/python benchmarks/native_kernels.py [--streams 16]

In one run, on whatever kernels this CPU gets (AMX, AVX512-BF16 or AVX2 + FMA):

  * roofline: the machine's read bandwidth (a float32 sum over 1 GiB, best of 5);
  * linear: batch-1 GB/s of the native linear and of torch's F.linear on the `small` model's
    weight shapes (enough copies of each weight to stream from memory, not cache), and the
    native / torch speed ratio at 16 and 128 rows;
  * prefill: a 2048-row step's gate|up linear GFLOP/s (native and oneDNN), the causal
    attention of one 512-token sequence (16 q / 8 kv heads; GFLOP/s of the causal half),
    and the fused SiLU*up and RMSNorm+RoPE passes' speed over the torch ops they replace;
  * decode attention: paged_decode_attention at 16 rows and 1 row of 576-token contexts
    (the small model's heads, K/V from memory): ms per layer call, K/V GB/s, and the
    speed over the torch fallback (gather + SDPA);
  * engine: the `small` demo model (Qwen3-0.6B's shapes, bf16) with `native_kernels` on and
    off, each in its own process (the switch holds for a process's life), alternated:
    batch-1 decode ms/step (median) and its share of the roofline (bytes of weights a step
    reads / bandwidth), and 16 streams' output tok/s and decode ms/step.

Prints one JSON line with all of it. Takes ~4 minutes on 2 quiet AVX2 cores (most of it the
torch-only engine); `--linear-only` skips the engine, `--attention-only` runs the decode
attention alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F
from common import demo_model, emit, random_prompts, run_variants

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


def bench_prefill(rows: int = 2048, seq_len: int = 512) -> dict:
    """A 2048-row prefill step's kernels (the small model's shapes): the gate|up linear's
    GFLOP/s (native and oneDNN), the causal attention of its 512-token sequences (GFLOP/s
    of the causal half), and the fused elementwise passes against the torch ops they replace
    (speed ratio)."""
    from xllm.models.layers import RMSNorm
    from xllm.ops import fast_norm_rotary, fast_silu_mul, kernels, pack_weight

    native = kernels()
    out: dict = {}
    w = (torch.randn(6144, 1024) / 32).bfloat16()
    x = torch.randn(rows, 1024).bfloat16()
    packed = pack_weight(w)
    flops = 2 * rows * 6144 * 1024
    out["linear_torch_gflops"] = round(flops / best_of([partial(F.linear, x, w)], 3) / 1e9, 1)
    if packed is not None:
        linear = partial(native.packed_bf16_linear, x, packed, 6144, None)
        out["linear_native_gflops"] = round(flops / best_of([linear], 3) / 1e9, 1)
    heads, kv_heads, dim = 16, 8, 128
    q = torch.randn(seq_len, heads, dim).bfloat16()
    k, v = torch.randn(2, seq_len, kv_heads, dim).bfloat16()
    if native is not None and (native.has_bf16_linear() or native.has_avx2_linear()):
        o = torch.empty_like(q)
        attn = partial(native.prefill_attention, o, q, k, v, 0, dim**-0.5)
        causal_flops = 4 * heads * dim * seq_len * seq_len / 2
        out["attention_gflops"] = round(causal_flops / best_of([attn], 5) / 1e9, 1)
    gate_up = torch.randn(rows, 6144).bfloat16()
    if fast_silu_mul(gate_up) is not None:
        gate, up = gate_up.chunk(2, dim=-1)
        ref = best_of([lambda: F.silu(gate) * up], 3)
        out["silu_mul_speedup"] = round(ref / best_of([partial(fast_silu_mul, gate_up)], 3), 2)
    qkv = torch.randn(rows, heads + 2 * kv_heads, dim).bfloat16()
    angles = torch.randn(rows, 1, dim)
    cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
    norm_w = torch.ones(dim).bfloat16()
    if fast_norm_rotary(qkv[:, :heads], cos, sin, norm_w, 1e-6) is not None:
        norm = RMSNorm(dim, 1e-6, torch.bfloat16)
        norm.weight.data = norm_w
        fused = partial(fast_norm_rotary, qkv[:, :heads], cos, sin, norm_w, 1e-6)

        def unfused():  # Qwen3's q_norm then apply_rotary, as torch ops
            y = norm(qkv[:, :heads])
            y1, y2 = y.chunk(2, dim=-1)
            return y * cos + torch.cat((-y2, y1), dim=-1) * sin

        out["norm_rope_speedup"] = round(best_of([unfused], 3) / best_of([fused], 3), 2)
    print(json.dumps({"prefill": out}), file=sys.stderr, flush=True)
    return out


def bench_decode_attention(rows: int, context: int, layers: int = 28, block: int = 16) -> dict:
    """One decode step's paged attention at `rows` sequences of `context` tokens (the small
    model's 16 q / 8 kv heads of 128, bf16, blocks scattered over the pool): ms per layer
    call, on `layers` pools of their own (as many as the model has, so each call's K/V come
    from memory, not cache), the GB/s of K/V that makes, and the speed over the torch
    fallback (gather + SDPA). The best single call of 5 rounds: one slow call on a loaded
    machine is a descheduled thread, not the kernel."""
    from xllm.ops import kernels

    native = kernels()
    heads, kv_heads, dim = 16, 8, 128
    per_seq = -(-context // block)
    num_blocks = rows * per_seq
    g = torch.Generator().manual_seed(rows)
    tables = torch.randperm(num_blocks, generator=g).view(rows, per_seq)
    lens = torch.full((rows,), context, dtype=torch.long)
    q = torch.randn(rows, heads, dim, generator=g).bfloat16()
    pools = [
        torch.randn(2, num_blocks * block, kv_heads, dim, generator=g).bfloat16()
        for _ in range(layers)
    ]
    out = torch.empty_like(q)
    scale = dim**-0.5
    kv_bytes = 2 * rows * context * kv_heads * dim * 2
    slots = (tables[:, :, None] * block + torch.arange(block)).view(rows, -1)[:, :context]

    def torch_call(kv):
        k, v = kv[0][slots].transpose(1, 2), kv[1][slots].transpose(1, 2)
        F.scaled_dot_product_attention(q.unsqueeze(2), k, v, scale=scale, enable_gqa=True)

    def native_call(kv):
        native.paged_decode_attention(out, q, kv[0], kv[1], tables, lens, block, scale)

    def best_call_ms(call, rounds: int) -> float:
        times = []
        for _ in range(rounds):
            for kv in pools:
                start = time.perf_counter()
                call(kv)
                times.append(time.perf_counter() - start)
        return min(times) * 1e3

    torch_ms = best_call_ms(torch_call, 2)
    result: dict = {"rows": rows, "context": context, "torch_ms": round(torch_ms, 3)}
    if native is not None:
        native_ms = best_call_ms(native_call, 5)
        result["native_ms"] = round(native_ms, 3)
        result["native_gbs"] = round(kv_bytes / native_ms / 1e6, 1)
        result["speedup_over_torch"] = round(torch_ms / native_ms, 2)
    print(json.dumps({"decode_attention": result}), file=sys.stderr, flush=True)
    return result


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
    parser.add_argument(
        "--attention-only", action="store_true", help="only the decode attention micro benchmark"
    )
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
    attention = [bench_decode_attention(16, 576), bench_decode_attention(1, 576)]
    if args.attention_only:
        emit(
            {
                "kernels": path,
                "threads": torch.get_num_threads(),
                "read_gbs": round(bandwidth, 1),
                "decode_attention": attention,
            }
        )
        return
    result = {
        "kernels": path,
        "threads": torch.get_num_threads(),
        "read_gbs": round(bandwidth, 1),
        "load_before": os.getloadavg()[0],
        "linear": bench_linear(),
        "prefill": bench_prefill(),
        "decode_attention": attention,
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
        for variant, (run,) in run_variants(child, ("on", "off")).items():
            result[f"engine_{variant}"] = run
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
