"""Beam search throughput: output tok/s of beam widths 4, 16 and 64 against width 1, one run.

Each width runs the same `--requests` prompts of `--input-len` random tokens, `--output-len`
tokens per beam (EOS ignored), all submitted at once, on the Qwen3-0.6B-shaped `small`
model in bfloat16. Output tokens are the tokens the beams decode (a step of a group with b
live beams decodes b); the returned beams are the best `n` = 1 of them.

    .venv/bin/python benchmarks/beam_search.py [--widths 4,16,64 --requests 1 --input-len 128 --output-len 32]

Prints a JSON line: per width the wall time, output tok/s, steps/s and the tok/s ratio to
width 1 (measured in the same run).
"""

from __future__ import annotations

import argparse
import time

from common import demo_model, emit, random_prompts

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.protocol.types import SamplingParams


def run(engine: Engine, prompts: list[list[int]], width: int, output_len: int) -> dict:
    params = SamplingParams(
        use_beam_search=True, beam_width=width, n=1, max_tokens=output_len, ignore_eos=True
    )
    ids = [f"w{width}-{i}" for i in range(len(prompts))]
    start = time.perf_counter()
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    decoded = steps = 0
    while engine.has_unfinished():
        # The beams that run this step each decode one token (a prompt's first step: one).
        decoded += sum(len(engine.sequences.get(rid, ())) for rid in ids)
        engine.step()
        steps += 1
    seconds = time.perf_counter() - start
    assert engine.block_manager.num_used_blocks == 0, "a finished search holds no block"
    return {
        "width": width,
        "seconds": round(seconds, 3),
        "output_tokens": decoded,
        "output_tok_per_s": round(decoded / seconds, 1),
        "steps_per_s": round(steps / seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--size", default="small", help="small (timed) or tiny (smoke run)")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--widths", default="4,16,64")
    parser.add_argument("--requests", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--kv-cache-gb", type=float, default=4.0)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]
    model_dir = demo_model(args.arch, args.size, dtype=args.dtype)
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype=args.dtype,
            max_num_seqs=max(widths) * args.requests,
            kv_cache_gb=args.kv_cache_gb,
            enable_prefix_caching=False,  # every width computes its prompts afresh
        )
    )
    vocab = engine.model_config.vocab_size
    # Warm-up (allocator, kernels) on other prompts, untimed.
    run(engine, random_prompts(1, 16, vocab, seed=99), 4, 4)
    prompts = random_prompts(args.requests, args.input_len, vocab)
    baseline = run(engine, prompts, 1, args.output_len)
    results = [run(engine, prompts, width, args.output_len) for width in widths]
    for r in results:
        r["ratio_vs_width_1"] = round(r["output_tok_per_s"] / baseline["output_tok_per_s"], 2)
    emit(
        {
            "benchmark": "beam_search",
            "model": f"{args.arch}-{args.size}-{args.dtype}",
            "requests": args.requests,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "width_1": baseline,
            "widths": results,
        }
    )


if __name__ == "__main__":
    main()
