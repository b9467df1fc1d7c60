"""The host KV tier in a served cluster (`xllm up`, real processes): a prompt whose prefix
other prompts pushed out of the instance's small device pool comes back from host memory,
as the heartbeat's tier counters show, with the same greedy text as the first time."""

from __future__ import annotations

import json
import time
import urllib.request

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster

pytestmark = pytest.mark.slow

BLOCK = 16
NUM_KV_BLOCKS = 48
PREFIX_BLOCKS = 20


def prompt(seed: int) -> list[int]:
    """20 full blocks and one token, sharing no block with another seed's."""
    return [100 + (seed * 7919 + 31 * i) % 3000 for i in range(PREFIX_BLOCKS * BLOCK + 1)]


def cluster_instances(config: ClusterConfig) -> list[dict]:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["instances"]


def host_hits(config: ClusterConfig) -> int:
    return sum(i["tiers"]["host"]["hits"] for i in cluster_instances(config))


def test_an_evicted_prefix_comes_back_from_host_memory(tiny_model_dir, tmp_path):
    model_dir = tiny_model_dir("qwen3", "float32")
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=1,
        log_dir=str(tmp_path),
        ready_timeout=180,
        stop_grace=5,
    )
    engine_args = ["--num-kv-blocks", str(NUM_KV_BLOCKS), "--host-kv-gb", "0.25"]
    engine_args += ["--max-model-len", str(NUM_KV_BLOCKS * BLOCK)]
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(config.ready_timeout)
        client = openai.OpenAI(base_url=config.base_url, api_key="-", max_retries=0)
        model = client.models.list().data[0].id

        def complete(tokens: list[int]) -> str:
            r = client.completions.create(model=model, prompt=tokens, max_tokens=8, temperature=0)
            return r.choices[0].text

        first = complete(prompt(0))
        for seed in (1, 2, 3):  # 60 blocks through a 48-block pool: prompt 0's are gone
            complete(prompt(seed))
        assert complete(prompt(0)) == first
        deadline = time.monotonic() + 20  # the heartbeat carries the counters
        while host_hits(config) < PREFIX_BLOCKS and time.monotonic() < deadline:
            time.sleep(0.5)
        assert host_hits(config) == PREFIX_BLOCKS
