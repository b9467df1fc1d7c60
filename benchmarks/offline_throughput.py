"""Offline throughput: our engine vs transformers' generate, same weights and dtype, one run.

The workload of the engine-core issue: 32 requests of 256 random input tokens and 128
output tokens (EOS ignored) on the Qwen3-0.6B-shaped `small` model in bfloat16. Ours gets
all 32 at once (continuous batching); transformers runs static batches of
`--hf-batch-size` with greedy decoding and EOS suppressed (min_new_tokens).

    .venv/bin/python benchmarks/offline_throughput.py [--requests 32 --input-len 256 --output-len 128]

Prints a JSON line: output tokens/s of both and their ratio (ours / transformers).
"""

from __future__ import annotations

import argparse
import time

import torch
from common import demo_model, emit, random_prompts

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.protocol.types import SamplingParams


def run_ours(model_dir, prompts, output_len: int, args) -> tuple[float, int]:
    engine = Engine(
        EngineConfig(
            model=str(model_dir),
            dtype="bfloat16",
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_gb=args.kv_cache_gb,
        )
    )
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    # Warm-up: one short request, so one-time costs (allocator, oneDNN kernels) are not timed.
    engine.add_request("warmup", prompts[0][:32], SamplingParams(max_tokens=4, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    start = time.perf_counter()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(d.token_ids) for d in engine.step())
    return time.perf_counter() - start, generated


def run_transformers(model_dir, prompts, output_len: int, batch_size: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    kwargs = dict(
        max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False, pad_token_id=0
    )
    with torch.inference_mode():
        model.generate(
            torch.tensor([prompts[0][:32]]), max_new_tokens=4, do_sample=False, pad_token_id=0
        )
        start = time.perf_counter()
        generated = 0
        for b in range(0, len(prompts), batch_size):
            batch = torch.tensor(prompts[b : b + batch_size])
            out = model.generate(batch, attention_mask=torch.ones_like(batch), **kwargs)
            generated += (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return time.perf_counter() - start, generated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gb", type=float, default=4.0)
    parser.add_argument("--skip-transformers", action="store_true")
    args = parser.parse_args()

    model_dir = demo_model(args.arch, "small")
    from xllm.models.config import ModelConfig

    vocab = min(ModelConfig.from_dir(model_dir).vocab_size, 4000)
    prompts = random_prompts(args.requests, args.input_len, vocab)
    ours_s, ours_tokens = run_ours(model_dir, prompts, args.output_len, args)
    result = {
        "benchmark": "offline_throughput",
        "model": f"{args.arch}-small-bf16",
        "requests": args.requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "threads": torch.get_num_threads(),
        "ours_output_tok_s": round(ours_tokens / ours_s, 2),
        "ours_seconds": round(ours_s, 2),
    }
    if not args.skip_transformers:
        hf_s, hf_tokens = run_transformers(model_dir, prompts, args.output_len, args.hf_batch_size)
        result |= {
            "transformers_output_tok_s": round(hf_tokens / hf_s, 2),
            "transformers_seconds": round(hf_s, 2),
            "transformers_batch_size": args.hf_batch_size,
            "ratio": round((ours_tokens / ours_s) / (hf_tokens / hf_s), 3),
        }
    emit(result)


if __name__ == "__main__":
    main()
