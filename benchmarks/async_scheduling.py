"""Async scheduling (`--async-scheduling`) off vs on: batch-1 decode and 16 streams, one run.

    PYTHONPATH=shared:. .venv/bin/python benchmarks/async_scheduling.py [--num-threads 1] \
        [--graph-mode]

The `small` demo model (Qwen3-0.6B's shapes, bf16) in our Engine, each variant in its own
process (which thread loads the model differs), alternated `--rounds` times: off, on, off, ...
Per variant (best round): batch-1 decode ms/step (median interval between steps' outputs),
16 streams' output tok/s and decode ms/step, and from `StepStats` the CPU-side scheduler
time per step (the engine thread's CPU time, with async) and the part of it hidden behind
the forward pass, and the process's CPU time per step (`*_cpu_ms`, all threads: what the
overlap costs in contention shows there even on a loaded machine). `--graph-mode`: both
variants' decode steps as one native call each.

Thread count: `--num-threads` torch (OpenMP) threads run the forward pass in both variants;
with async scheduling the engine thread schedules beside them (a second Python thread that
mostly waits), so compare at 1 torch thread on 2 cores (a core free for either) and at 2
(the scheduler then competes with the forward for the cores).

Prints one JSON line. The smoke run: `--size tiny --dtype float32 --streams 2 --output-len 4
--prompt-len 8 --rounds 1`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from common import demo_model, emit, random_prompts, run_variants


def engine_child(overlap: bool, args) -> dict:
    """One variant, in this process: batch-1 decode steps, then `streams` at once."""
    from xllm.config import EngineConfig
    from xllm.engine.engine import Engine
    from xllm.protocol.types import SamplingParams

    model_dir = demo_model("qwen3", args.size, dtype=args.dtype)
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype=args.dtype,
            max_num_seqs=max(args.streams, 1),
            kv_cache_gb=1.0,
            num_threads=args.num_threads,
            async_scheduling=overlap,
            graph_mode=args.graph_mode,
        )
    )
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(args.streams + 1, args.prompt_len, vocab, seed=1)

    def run(batch: list[list[int]], tag: str) -> dict:
        params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
        for i, prompt in enumerate(batch):
            engine.add_request(f"{tag}{i}", prompt, params)
        stats = engine.step_stats
        steps0, sched0, hidden0 = (
            stats.num_steps,
            stats.scheduler_seconds,
            stats.hidden_scheduler_seconds,
        )
        intervals, generated, start = [], 0, time.perf_counter()
        cpu = time.process_time()
        last = start
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter()
            intervals.append(now - last)
            last = now
            generated += sum(len(o.token_ids) for o in outputs)
        num_steps = max(1, stats.num_steps - steps0)
        return {
            "seconds": time.perf_counter() - start,
            "generated": generated,
            "decode_ms": statistics.median(intervals[1:] or intervals) * 1e3,  # not the prefill
            "scheduler_ms": (stats.scheduler_seconds - sched0) / num_steps * 1e3,
            "hidden_ms": (stats.hidden_scheduler_seconds - hidden0) / num_steps * 1e3,
            "cpu_ms": (time.process_time() - cpu) / num_steps * 1e3,
        }

    run([prompts[-1][: max(1, args.prompt_len // 2)]], "warmup")
    b1 = run([prompts[0]], "b1-")
    streams = run(prompts[1 : args.streams + 1], "s-")
    return {
        "b1_decode_ms": round(b1["decode_ms"], 2),
        "b1_scheduler_ms": round(b1["scheduler_ms"], 3),
        "b1_hidden_ms": round(b1["hidden_ms"], 3),
        "b1_cpu_ms": round(b1["cpu_ms"], 2),
        "streams_tok_s": round(streams["generated"] / streams["seconds"], 1),
        "streams_decode_ms": round(streams["decode_ms"], 1),
        "streams_scheduler_ms": round(streams["scheduler_ms"], 3),
        "streams_hidden_ms": round(streams["hidden_ms"], 3),
        "streams_cpu_ms": round(streams["cpu_ms"], 2),
    }


def best(runs: list[dict]) -> dict:
    """Each figure's best over the rounds (the least disturbed by other load)."""
    return {key: (max if key.endswith("tok_s") else min)(r[key] for r in runs) for key in runs[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--num-threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--graph-mode", action="store_true", help="graph mode in both variants")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(engine_child(args.child == "on", args)), flush=True)
        return
    demo_model("qwen3", args.size, dtype=args.dtype)  # made once, before the timed children
    child = [sys.executable, __file__, "--child"]
    for flag in ("size", "dtype", "streams", "prompt_len", "output_len", "num_threads"):
        child[2:2] = [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    if args.graph_mode:
        child.insert(2, "--graph-mode")
    result: dict = {"num_threads": args.num_threads, "graph_mode": args.graph_mode}
    result["load_before"] = os.getloadavg()[0]
    runs = run_variants(child, rounds=args.rounds)
    off, on = best(runs["off"]), best(runs["on"])
    result.update(off=off, on=on)
    result["b1_speedup"] = round(off["b1_decode_ms"] / on["b1_decode_ms"], 3)
    result["streams_speedup"] = round(on["streams_tok_s"] / off["streams_tok_s"], 3)
    result["load_after"] = os.getloadavg()[0]
    emit(result)


if __name__ == "__main__":
    main()
