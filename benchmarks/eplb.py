"""EPLB: Qwen3-MoE expert imbalance (max / mean tokens per expert copy) before and after.

A skewed workload — prompts drawn from a narrow band of token ids, so their tokens crowd
onto a few experts — runs through two engines on the same random-weight Qwen3-MoE:

  * before: one slot per expert, placement fixed (`--num-redundant-experts 0`);
  * after: `--redundant` extra slots and EPLB every `--interval` steps; a warm-up run of
    the same workload lets it learn the load and re-place, then the measured run.

The imbalance is max / mean (token, expert) pairs per expert copy in each MoE layer over the
measured run, averaged over layers (1.0 = even), read from the layers' slot counters. The
greedy tokens of both engines are compared (copies hold the same weights: they must match).

    PYTHONPATH=shared:. .venv/bin/python benchmarks/eplb.py [--size tiny --redundant 8]

Prints one JSON line. tok/s figures are only indicative on a shared machine.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import demo_model, emit

from xllm.config import EngineConfig
from xllm.engine import eplb
from xllm.engine.engine import Engine
from xllm.protocol import SamplingParams


def skewed_prompts(n: int, length: int, band: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 10 + band, (n, length), generator=g).tolist()


def run(engine: Engine, prompts, output_len: int, tag: str) -> tuple[dict, float, float]:
    """Generate greedily; returns the tokens, the run's imbalance and its output tok/s."""
    layers = engine.experts.layers
    before = [layer.slot_load.clone() for layer in layers]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    tokens: dict[int, list[int]] = {}
    start = time.perf_counter()
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(int(delta.request_id.split("-")[1]), []).extend(delta.token_ids)
    seconds = time.perf_counter() - start
    loads = [(layer.slot_load - b).tolist() for layer, b in zip(layers, before, strict=True)]
    imbalance = sum(eplb.imbalance(load) for load in loads) / len(loads)
    return tokens, imbalance, len(prompts) * output_len / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "small"))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--redundant", type=int, default=0, help="0 = half the experts")
    parser.add_argument("--interval", type=int, default=8, help="steps per EPLB window")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--band", type=int, default=40, help="distinct prompt token ids")
    args = parser.parse_args()

    model_dir = demo_model("qwen3-moe", args.size, dtype=args.dtype)
    prompts = skewed_prompts(args.requests, args.input_len, args.band)

    def engine(**options) -> Engine:
        config = EngineConfig(model=str(model_dir), dtype=args.dtype, kv_cache_gb=0.5, **options)
        return Engine(config)

    plain = engine(eplb_interval=args.interval)
    num_experts = plain.model_config.num_experts
    redundant = args.redundant or num_experts // 2
    run(plain, prompts, 4, "warmup")  # every step shape once, so the timed run has no firsts
    expected, before, tok_s_before = run(plain, prompts, args.output_len, "run")

    balanced = engine(num_redundant_experts=redundant, eplb_interval=args.interval)
    warm, _, _ = run(balanced, prompts, args.output_len, "learn")
    learnt = balanced.expert_stats()
    got, after, tok_s_after = run(balanced, prompts, args.output_len, "run")
    stats = balanced.expert_stats()
    emit(
        {
            "benchmark": "eplb",
            "model": f"qwen3-moe-{args.size}-{args.dtype}",
            "num_experts": num_experts,
            "top_k": plain.model_config.num_experts_per_tok,
            "num_slots": stats.num_slots,
            "workload": {
                "requests": args.requests,
                "input_len": args.input_len,
                "output_len": args.output_len,
                "token_band": args.band,
            },
            "imbalance_before": round(before, 3),
            "imbalance_after": round(after, 3),
            "predicted_after": round(learnt.predicted_imbalance, 3),
            "num_rebalances": stats.num_rebalances,
            "rebalances_during_measured_run": stats.num_rebalances - learnt.num_rebalances,
            "output_unchanged": got == expected and warm == expected,
            "tok_s_before": round(tok_s_before, 1),
            "tok_s_after": round(tok_s_after, 1),
        }
    )


if __name__ == "__main__":
    main()
