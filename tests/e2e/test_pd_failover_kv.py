"""PD failover that keeps the KV, as real processes: `xllm up --prefill 1 --decode 2
--kv-store`. Every instance puts the full blocks it computes or receives in the Mooncake
Store, two copies each. SIGKILL the decode instance streaming a long-prompt request: the
gateway resumes it (prompt + tokens streamed); the prefill instance serves that prompt from
its own copy of the prompt's KV and the store's copies of the blocks decoded before the kill,
recomputing only the rest; the other decode instance's reservation asks its tiers (the
store) first, once, and takes the rest from the prefill side. The text is the engine's alone."""

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
        prefill=1,
        decode=2,
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


def test_a_killed_decode_instances_request_resumes_from_the_kv_kept_elsewhere(cluster, model_dir):
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
            lambda: [
                i for i in instances(config) if i["role"] == "decode" and i["load"]["num_running"]
            ],
            10,
            "a decode instance running it",
        )
        victim = running[0]["instance_id"]
        os.kill(c.processes[victim].pid, signal.SIGKILL)
        wait_for(lambda: len(instances(config)) == 2, 10, "the victim to leave")
        future.result(timeout=300)

    llm = LLM(str(model_dir), num_kv_blocks=NUM_KV_BLOCKS)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    expected = llm.generate([prompt_ids], params)[0].outputs[0].token_ids
    assert "".join(streamed) == llm.tokenizer.decode(expected)

    # Nothing computed before the kill is computed again: the prefill instance serves the
    # resumed prompt (prompt + tokens streamed) from its copy of the prompt's KV (and the
    # store's copies of blocks the victim decoded), and sends it to the survivor.
    prompt_blocks = (len(prompt_ids) - 1) // 16
    by_role = {}
    for i in wait_for(lambda: instances(config), 10, "the cluster"):
        by_role.setdefault(i["role"], []).append(i)
    (prefill,), (survivor,) = by_role["prefill"], by_role["decode"]
    assert prefill["kv"]["prefix_hit_tokens"] >= prompt_blocks * 16
    # The survivor's reservation tried the store first, once: a load that fails (here the
    # copies it finds are on the killed instance's segment) falls back to the prefill
    # side's transfer instead of being retried while the request waits.
    store = survivor["tiers"]["store"]
    assert store["num_loads"] + store["failed_loads"] <= 1
    assert store["bytes_loaded"] == store["hits"] * block_bytes(model_dir)
