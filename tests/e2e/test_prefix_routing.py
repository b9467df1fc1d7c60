"""Cache-aware routing on a real 2-instance cluster (kvstore and Valkey included).

A burst of requests sharing a long system prompt, after one request has warmed it on some
instance: under `cache-aware` the burst goes where the prompt lives (its prefix hits show on
that instance only), under `least-load` it spreads over both and the cluster hits less.
Outputs are the same either way: routing changes where KV is reused, never what is computed.
"""

from __future__ import annotations

import json
import random
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster

pytestmark = pytest.mark.slow

SYSTEM_TOKENS = 640  # 40 blocks of 16
BURST = 6
MAX_TOKENS = 8


def run_workload(model_dir, policy: str, log_dir) -> tuple[list[list[int]], dict]:
    """(completion token ids per request, /cluster afterwards) for the same workload."""
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=2,
        policy=policy,
        log_dir=str(log_dir),
        ready_timeout=180,
        stop_grace=5,
    )
    engine_args = ["--num-kv-blocks", "1024", "--max-model-len", "2048"]
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(config.ready_timeout)
        client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
        rng = random.Random(0)
        system = [rng.randrange(100, 1000) for _ in range(SYSTEM_TOKENS)]
        prompts = [system + [rng.randrange(100, 1000) for _ in range(20)] for _ in range(BURST + 1)]

        def complete(prompt: list[int]) -> list[int]:
            response = client.completions.create(
                model=client.models.list().data[0].id,
                prompt=prompt,
                max_tokens=MAX_TOKENS,
                temperature=0,
                logprobs=0,
                extra_body={"ignore_eos": True},
            )
            return response.choices[0].logprobs.tokens

        outputs = [complete(prompts[0])]  # warms the system prompt on one instance
        time.sleep(1.0)  # its KV events reach the kvstore
        with ThreadPoolExecutor(BURST) as pool:
            outputs += list(pool.map(complete, prompts[1:]))
        time.sleep(1.0)  # the last heartbeats carry the final counters
        with urllib.request.urlopen(config.base_url.removesuffix("/v1") + "/cluster") as r:
            state = json.load(r)
    return outputs, state


def hits_by_instance(state: dict) -> dict[str, tuple[int, int]]:
    """instance -> (prompt tokens it served, of which prefix-cache hits)."""
    return {
        i["instance_id"]: (i["kv"]["prefix_queried_tokens"], i["kv"]["prefix_hit_tokens"])
        for i in state["instances"]
    }


def test_cache_aware_sends_the_burst_to_the_prefix_and_hits_more(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen3", "float32")
    aware_out, aware = run_workload(model_dir, "cache-aware", tmp_path / "aware")
    spread_out, spread = run_workload(model_dir, "least-load", tmp_path / "spread")

    assert aware_out == spread_out

    served = {i: q for i, (q, _) in hits_by_instance(aware).items() if q}
    assert len(served) == 1, f"cache-aware used more than the holder: {hits_by_instance(aware)}"
    holder_hits = hits_by_instance(aware)[next(iter(served))][1]
    assert holder_hits >= BURST * SYSTEM_TOKENS

    assert all(q for q, _ in hits_by_instance(spread).values()), "least-load did not spread"
    assert aware["prefix_cache"]["hit_tokens"] > spread["prefix_cache"]["hit_tokens"]
    assert aware["prefix_cache"]["hit_rate"] > spread["prefix_cache"]["hit_rate"]
