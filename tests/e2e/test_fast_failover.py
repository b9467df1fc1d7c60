"""A SIGKILLed instance is noticed through its supervisor, not its heartbeats: real processes
(nats-server, Valkey, kvstore, scheduler, two PD-colocated instances, gateway) run by the
`Cluster` that `xllm up` uses, with the scheduler's heartbeat timeout raised to a minute.
The request streaming on the killed instance still resumes on the other within seconds,
which only the supervisor's `InstanceExited` report can make happen, and its text is the
engine alone's."""

from __future__ import annotations

import itertools
import json
import os
import signal
import threading
import time
import urllib.request

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster

pytestmark = pytest.mark.slow

HEARTBEAT_TIMEOUT = 60.0
RESUME_BOUND = 15.0
"""Seconds the stream may stall after the kill: a quarter of the heartbeat timeout, with
room for a loaded machine (the supervisor reports the exit within 50 ms)."""
MAX_TOKENS, KILL_AFTER = 600, 20  # long enough to be running when the heartbeats say so
PROMPT = "The quick brown fox jumps over the lazy dog. " * 8


@pytest.fixture
def cluster(tiny_model_dir, tmp_path, monkeypatch):
    model_dir = tiny_model_dir("qwen3", "float32")
    # The scheduler's (and kvstore's) --heartbeat-timeout, through the environment.
    monkeypatch.setenv("XLLM_HEARTBEAT_TIMEOUT", str(HEARTBEAT_TIMEOUT))
    # A float32 model: the bf16 kernels would not run, and building them stalls the stream.
    monkeypatch.setenv("XLLM_NATIVE_KERNELS", "0")
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=2,
        policy="round-robin",
        log_dir=str(tmp_path / "logs"),
        ready_timeout=180,
        stop_grace=5,
        max_restarts=0,
    )
    c = serving_cluster(config, ["--num-kv-blocks", "256", "--num-threads", "1"])
    c.start()
    try:
        c.wait_ready(config.ready_timeout)
        yield c, config
    finally:
        c.stop()


def live_instances(config) -> list[dict]:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["instances"]


def test_a_killed_instances_request_resumes_long_before_its_heartbeats_time_out(cluster):
    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    c, config = cluster
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    arrivals: list[float] = []
    texts: list[str] = []
    started = threading.Event()

    def stream() -> None:
        chunks = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in chunks:
            arrivals.append(time.monotonic())
            texts.append(chunk.choices[0].text)
            if len(arrivals) >= KILL_AFTER:
                started.set()

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(120), "the stream did not start"
    running: list[str] = []
    deadline = time.monotonic() + 10
    while not running and time.monotonic() < deadline:  # heartbeats report it a beat late
        running = [i["instance_id"] for i in live_instances(config) if i["load"]["num_running"]]
        time.sleep(0.05)
    (victim,) = running
    killed_at = time.monotonic()
    os.kill(c.processes[victim].pid, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive(), "the stream never finished"
    # Out of the rotation, though its heartbeats would keep it there for a minute.
    survivors = [i["instance_id"] for i in live_instances(config)]
    assert survivors and victim not in survivors
    last_before = max(i for i, t in enumerate(arrivals) if t < killed_at)
    stall = max(b - a for a, b in itertools.pairwise(arrivals[last_before:]))
    assert stall < RESUME_BOUND < HEARTBEAT_TIMEOUT

    llm = LLM(config.model, num_kv_blocks=256)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    expected = llm.generate([prompt_ids], params)[0].outputs[0].token_ids
    assert "".join(texts) == llm.tokenizer.decode(expected)
