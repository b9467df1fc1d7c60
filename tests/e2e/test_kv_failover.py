"""Failover that keeps the KV, as real processes, `xllm up --kv-store` (nats-server, Valkey,
the Mooncake Store master, kvstore, scheduler, instances, gateway). Every instance puts the
full blocks it computes or receives in the Mooncake Store, two copies each. SIGKILL the
instance streaming a long-prompt request; the gateway resumes it (prompt + tokens streamed)
and the text is the engine's alone.

* Colocated (two instances): the survivor fetches the blocks from the store instead of
  recomputing the prompt.
* PD (`--prefill 1 --decode 2`), the decode instance killed: the prefill instance serves the
  resumed prompt from its own copy of the prompt's KV (and the store's copies of the blocks
  decoded before the kill), recomputing only the rest; the other decode instance's
  reservation fetches the blocks from the store first and takes the rest from the prefill
  side. The store still lists the dead instance's segment (its lease has not run out), so
  the blocks whose first copy was there (the victim's decoded blocks, which the prefill
  instance fetches to serve the resumed prompt) are read from their other copy
  (`replica_reads`), and no store load fails."""

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
MAX_TOKENS = 300


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


def block_bytes(model_dir: Path, block_size: int = 16) -> int:
    c = json.loads((model_dir / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    return c["num_hidden_layers"] * 2 * block_size * c["num_key_value_heads"] * head_dim * 4


def start_cluster(model_dir: Path, log_dir: str, **topology):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        policy="round-robin",
        kv_store=True,
        log_dir=log_dir,
        ready_timeout=180,
        stop_grace=5,
        **topology,
    )
    host_gb = 1.5 * NUM_KV_BLOCKS * block_bytes(model_dir) / 2**30
    engine_args = ["--num-kv-blocks", str(NUM_KV_BLOCKS), "--host-kv-gb", str(host_gb)]
    engine_args += ["--kv-store-replicas", "2", "--kv-store-segment-gb", "0.25"]
    c = serving_cluster(config, engine_args)
    c.start()
    return c, config


@pytest.fixture  # a fresh cluster per case: each one kills an instance
def colocated(model_dir, tmp_path_factory):
    c, config = start_cluster(model_dir, str(tmp_path_factory.mktemp("logs")), instances=2)
    try:
        c.wait_ready(config.ready_timeout)
        yield c, config
    finally:
        c.stop()


@pytest.fixture(scope="module")
def disaggregated(model_dir, tmp_path_factory):
    c, config = start_cluster(model_dir, str(tmp_path_factory.mktemp("logs")), prefill=1, decode=2)
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


def stream_through_a_kill(
    cluster, victim_role: str | None, kill_after: int = 40, seed: int | None = None
) -> tuple[str, list[int]]:
    """Stream PROMPT (greedy, or sampled at temperature 1 with `seed`), SIGKILL the instance
    (of `victim_role`, if given) running it once `kill_after` chunks have arrived, and check
    the whole text equals the engine alone's; returns the text and the prompt's token ids."""
    temperature = 0.0 if seed is None else 1.0
    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    c, config = cluster
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    streamed, started = [], threading.Event()

    def stream() -> None:
        chunks = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=seed,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            streamed.append(chunk.choices[0].text)
            if len(streamed) >= kill_after:
                started.set()

    def running_it() -> list[dict]:
        return [
            i
            for i in instances(config)
            if i["load"]["num_running"] and victim_role in (None, i["role"])
        ]

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream)
        if not started.wait(180):
            future.result(timeout=1)
            raise AssertionError(f"the stream did not start: {streamed}")
        before = len(instances(config))
        victim = wait_for(running_it, 10, "an instance running it")[0]["instance_id"]
        os.kill(c.processes[victim].pid, signal.SIGKILL)
        wait_for(lambda: len(instances(config)) == before - 1, 10, "the victim to leave")
        future.result(timeout=300)

    llm = LLM(config.model, num_kv_blocks=NUM_KV_BLOCKS)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, ignore_eos=True
    )
    expected = llm.generate([prompt_ids], params)[0].outputs[0].token_ids
    text = "".join(streamed)
    assert text == llm.tokenizer.decode(expected)
    return text, prompt_ids


@pytest.mark.parametrize("seed", [None, 7], ids=["greedy", "seeded"])
def test_a_killed_instances_request_resumes_with_its_kv_fetched_from_the_store(
    colocated, model_dir, seed
):
    _, config = colocated
    _, prompt_ids = stream_through_a_kill(colocated, victim_role=None, seed=seed)
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


def test_a_killed_decode_instances_request_resumes_from_the_kv_kept_elsewhere(
    disaggregated, model_dir
):
    _, config = disaggregated
    # Killed after ~10 blocks decoded, each put by the victim in its own segment and one
    # other: the resumed prompt's blocks the prefill instance fetches from the store.
    _, prompt_ids = stream_through_a_kill(disaggregated, victim_role="decode", kill_after=160)
    # Nothing computed before the kill is computed again: the prefill instance serves the
    # resumed prompt (prompt + tokens streamed) from its copy of the prompt's KV (and the
    # store's copies of blocks the victim decoded), and sends it to the survivor.
    prompt_blocks = (len(prompt_ids) - 1) // 16
    by_role = {}
    for i in wait_for(lambda: instances(config), 10, "the cluster"):
        by_role.setdefault(i["role"], []).append(i)
    (prefill,), (survivor,) = by_role["prefill"], by_role["decode"]
    assert prefill["kv"]["prefix_hit_tokens"] >= prompt_blocks * 16
    # The survivor's reservation re-fetched the prompt's blocks from the store, once; the
    # blocks whose first copy was in the dead instance's segment were read from their other
    # replica: no store load failed anywhere, nothing was recomputed.
    store = survivor["tiers"]["store"]
    assert store["num_loads"] == 1 and store["hits"] >= prompt_blocks
    assert store["bytes_loaded"] == store["hits"] * block_bytes(model_dir)
    stores = [i["tiers"]["store"] for i in (prefill, survivor)]
    assert all(s["failed_loads"] == 0 for s in stores)
    assert sum(s["replica_reads"] for s in stores) > 0
