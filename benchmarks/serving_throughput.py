"""Serving throughput: the whole cluster over HTTP vs the engine alone, same model, one run.

32 concurrent streaming completions of 256 random input tokens and 128 output tokens
(EOS ignored) on the Qwen3-0.6B-shaped `small` model in bfloat16:

  * engine: the same 32 requests submitted to an in-process `Engine` at once;
  * service: `xllm up` with one PD-colocated instance (nats-server, scheduler, instance,
    gateway as processes), driven by 32 concurrent streaming clients (aiohttp).

    .venv/bin/python benchmarks/serving_throughput.py [--streams 32 --input-len 256 --output-len 128]

MoE expert parallelism served: `--arch qwen3-moe --expert-parallel-size 2 --instance-threads 1`
(the instance is 2 rank processes of 1 torch thread each; the engine baseline stays one
process with torch's default threads).

Prints a JSON line: output tokens/s of both and the ratio service / engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time

import aiohttp
from common import demo_model, emit, random_prompts
from offline_throughput import run_ours

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster


async def stream_one(
    session: aiohttp.ClientSession, url: str, prompt: list[int], output_len: int
) -> int:
    body = {
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    tokens = 0
    async with session.post(url, json=body) as response:
        response.raise_for_status()
        async for line in response.content:
            if line.startswith(b"data: {"):
                usage = json.loads(line[6:]).get("usage")
                if usage:
                    tokens = usage["completion_tokens"]
    return tokens


async def drive(base_url: str, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        url = base_url + "/completions"
        await stream_one(session, url, prompts[0][:32], 4)  # warm-up
        start = time.perf_counter()
        counts = await asyncio.gather(*(stream_one(session, url, p, output_len) for p in prompts))
    return time.perf_counter() - start, sum(counts)


def run_service(model_dir, prompts, output_len: int, args) -> tuple[float, int]:
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=1,
        log_dir=tempfile.mkdtemp(prefix="xllm-bench-"),
        log_level="WARNING",
    )
    engine_args = [
        "--dtype", "bfloat16",
        "--max-num-seqs", str(args.max_num_seqs),
        "--max-num-batched-tokens", str(args.max_num_batched_tokens),
        "--kv-cache-gb", str(args.kv_cache_gb),
    ]  # fmt: skip
    if args.expert_parallel_size > 1:
        engine_args += ["--expert-parallel-size", str(args.expert_parallel_size)]
    if args.instance_threads:
        engine_args += ["--num-threads", str(args.instance_threads)]
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        return asyncio.run(drive(config.base_url, prompts, output_len))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--kv-cache-gb", type=float, default=4.0)
    parser.add_argument("--size", default="small", help="tiny: a smoke run")
    parser.add_argument(
        "--expert-parallel-size", type=int, default=1, help="MoE: ranks per instance"
    )
    parser.add_argument("--instance-threads", type=int, default=0, help="torch threads per rank")
    args = parser.parse_args()

    model_dir = demo_model(args.arch, args.size)
    prompts = random_prompts(args.streams, args.input_len, 4000)
    engine_s, engine_tokens = run_ours(model_dir, prompts, args.output_len, args)
    service_s, service_tokens = run_service(model_dir, prompts, args.output_len, args)
    expected = args.streams * args.output_len
    engine_rate, service_rate = engine_tokens / engine_s, service_tokens / service_s
    emit(
        {
            "benchmark": "serving_throughput",
            "model": f"{args.arch}-{args.size}-bf16",
            "expert_parallel_size": args.expert_parallel_size,
            "streams": args.streams,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "engine_output_tok_s": round(engine_rate, 2),
            "service_output_tok_s": round(service_rate, 2),
            "ratio": round(service_rate / engine_rate, 3),
            "all_tokens_returned": service_tokens == expected and engine_tokens == expected,
        }
    )


if __name__ == "__main__":
    main()
