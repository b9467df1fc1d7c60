"""Failover that keeps the KV, as real processes: `xllm up --kv-store` (nats-server, Valkey,
the Mooncake Store master, kvstore, scheduler, two instances, gateway). Instances put every
full block they compute (prompt and decode alike) in the store, two copies each; SIGKILL the
instance streaming a long-prompt request and the survivor resumes it by fetching the blocks
from the store instead of recomputing the prompt, with the text the engine alone gives."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster

pytestmark = pytest.mark.slow

NUM_KV_BLOCKS = 512
PROMPT = "The quick brown fox jumps over the lazy dog, and then it runs into the woods. " * 12


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


def block_bytes(model_dir: Path, block_size: int = 16) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * block_size * c["num_key_value_heads"] * head_dim * 4


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=2,
        policy="round-robin",
        kv_store=True,
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=180,
        stop_grace=5,
    )
    host_gb = 1.5 * NUM_KV_BLOCKS * block_bytes(model_dir) / 2**30
    engine_args = ["--num-kv-blocks", str(NUM_KV_BLOCKS), "--host-kv-gb", str(host_gb)]
    engine_args += ["--kv-store-replicas", "2", "--kv-store-segment-gb", "0.25"]
    c = serving_cluster(config, engine_args)
    c.start()
    try:
        c.wait_ready(config.ready_timeout)
        yield c, config
    finally:
        c.stop()


def instances(config) -> list[dict]:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["instances"]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_killed_instances_request_resumes_with_its_kv_fetched_from_the_store(cluster, model_dir):
    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    c, config = cluster
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    max_tokens = 300
    streamed, started = [], threading.Event()

    def stream() -> None:
        chunks = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            streamed.append(chunk.choices[0].text)
            if len(streamed) >= 40:
                started.set()

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream)
        if not started.wait(180):
            future.result(timeout=1)
            raise AssertionError(f"the stream did not start: {streamed}")
        running = wait_for(
            lambda: [i for i in instances(config) if i["load"]["num_running"]], 10, "running"
        )
        victim = running[0]["instance_id"]
        os.kill(c.processes[victim].pid, signal.SIGKILL)
        wait_for(lambda: len(instances(config)) == 1, 10, "the victim to leave")
        future.result(timeout=300)

    llm = LLM(str(model_dir), num_kv_blocks=NUM_KV_BLOCKS)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    expected = llm.generate([prompt_ids], params)[0].outputs[0].token_ids
    assert "".join(streamed) == llm.tokenizer.decode(expected)

    # The survivor fetched at least every prompt block (and the decode blocks filled before
    # the kill) instead of recomputing them.
    prompt_blocks = (len(prompt_ids) - 1) // 16
    survivor = wait_for(
        lambda: [i for i in instances(config) if i["tiers"]["store"]["hits"] >= prompt_blocks],
        10,
        "a heartbeat of the survivor counting the blocks it fetched",
    )[0]
    store = survivor["tiers"]["store"]
    assert store["bytes_loaded"] == store["hits"] * block_bytes(model_dir)
    assert store["failed_loads"] == 0
