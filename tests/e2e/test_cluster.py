"""The whole cluster as real processes: nats-server, valkey, scheduler, instances, gateway.

Driven with the official `openai` client, as users do. Outputs must equal the engine's
own (same weights, greedy); bad input must get OpenAI-style 4xx errors while the server
keeps serving; a client that hangs up must leave no KV blocks held; and an instance killed
with SIGKILL mid-request must leave the rotation while its request resumes on the other.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 4096
PROMPT = "The quick brown fox jumps over the lazy dog, and then"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


@pytest.fixture(scope="module")
def cluster(model_dir, tmp_path_factory):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=2,
        policy="round-robin",
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=180,
        stop_grace=5,
    )
    engine_args = ["--num-kv-blocks", "512", "--max-model-len", str(MAX_MODEL_LEN)]
    c = serving_cluster(config, engine_args)
    c.start()
    try:
        c.wait_ready(config.ready_timeout)
        yield c, config
    finally:
        c.stop()


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[1].base_url, api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine_greedy(model_dir):
    """Greedy tokens of the engine alone, in this process, on the same weights."""
    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    llm = LLM(str(model_dir), num_kv_blocks=512, max_model_len=MAX_MODEL_LEN)

    def run(prompt_ids: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return llm.generate([prompt_ids], params)[0].outputs[0].token_ids

    run.tokenizer = llm.tokenizer
    return run


def cluster_state(config) -> dict:
    url = config.base_url.removesuffix("/v1") + "/cluster"
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def blocks_held(config) -> int:
    return sum(i["kv"]["blocks_used"] for i in cluster_state(config)["instances"])


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_completions_equal_the_engine_alone(cluster, client, engine_greedy):
    model = client.models.list().data[0].id
    prompt_ids = engine_greedy.tokenizer.encode(PROMPT)
    expected = engine_greedy(prompt_ids, 24)
    for _ in range(2):  # round-robin: both instances
        response = client.completions.create(
            model=model,
            prompt=PROMPT,
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert response.choices[0].text == engine_greedy.tokenizer.decode(expected)
        assert response.usage.prompt_tokens == len(prompt_ids)
        assert response.usage.completion_tokens == 24
        assert response.usage.total_tokens == len(prompt_ids) + 24


def test_streaming_completion_matches_non_streaming(client):
    model = client.models.list().data[0].id
    kw = dict(
        model=model, prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
    )
    whole = client.completions.create(**kw).choices[0].text
    chunks = client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    text, usage = "", None
    for chunk in chunks:
        if chunk.choices:
            text += chunk.choices[0].text
        if chunk.usage:
            usage = chunk.usage
    assert text == whole
    assert usage is not None and usage.completion_tokens == 20


def test_chat_equals_the_engine_on_the_chat_template(cluster, engine_greedy):
    messages = [{"role": "user", "content": "Say something about foxes."}]
    prompt_ids = engine_greedy.tokenizer.encode_chat(messages)
    expected = engine_greedy.tokenizer.decode(engine_greedy(prompt_ids, 16))

    async def run() -> tuple[str, str]:
        client = openai.AsyncOpenAI(base_url=cluster[1].base_url, api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        kw = dict(
            model=model,
            messages=messages,
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        whole = await client.chat.completions.create(**kw)
        stream = await client.chat.completions.create(stream=True, **kw)
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return whole.choices[0].message.content, streamed

    whole, streamed = asyncio.run(run())
    assert whole == expected
    assert streamed == expected


def test_32_concurrent_streams_get_their_token_counts(cluster):
    async def one(client, model, i) -> int:
        stream = await client.completions.create(
            model=model,
            prompt=f"{PROMPT} {i}",
            max_tokens=8 + i,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        usage = None
        async for chunk in stream:
            usage = chunk.usage or usage
        return usage.completion_tokens

    async def run() -> list[int]:
        client = openai.AsyncOpenAI(base_url=cluster[1].base_url, api_key="unused", max_retries=0)
        model = (await client.models.list()).data[0].id
        counts = await asyncio.gather(*(one(client, model, i) for i in range(32)))
        await client.close()
        return counts

    assert asyncio.run(run()) == [8 + i for i in range(32)]
    wait_for(lambda: blocks_held(cluster[1]) == 0, 10, "all KV blocks released")


def test_client_disconnect_frees_the_requests_kv_blocks(cluster, client):
    model = client.models.list().data[0].id
    # ~4000 tokens take the tiny model well over the few seconds this test needs.
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    wait_for(lambda: blocks_held(cluster[1]) > 0, 5, "the running request to hold blocks")
    stream.close()  # hang up mid-stream
    hung_up = time.monotonic()
    wait_for(lambda: blocks_held(cluster[1]) == 0, 10, "the aborted request's blocks freed")
    assert time.monotonic() - hung_up < 3, "freed by the abort, not by finishing"


@pytest.mark.parametrize(
    "body, status",
    [
        ("{not json", 400),
        (json.dumps({"model": "no-such-model", "prompt": "hi"}), 404),
        (json.dumps({"prompt": "hi", "max_tokens": -1}), 400),
        (json.dumps({"prompt": "hi", "max_tokens": 10**9}), 400),
        (json.dumps({"prompt": "hi " * 6000, "max_tokens": 4}), 400),
    ],
)
def test_bad_input_gets_an_openai_error_and_the_server_keeps_serving(cluster, client, body, status):
    url = cluster[1].base_url + "/completions"
    request = urllib.request.Request(
        url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with pytest.raises(urllib.error.HTTPError) as failure:
        urllib.request.urlopen(request, timeout=30)
    assert failure.value.code == status
    error = json.load(failure.value)["error"]
    assert error["message"] and error["type"]
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="still there?", max_tokens=3).choices


def test_wrong_api_key_is_401(model_dir, tmp_path):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        api_key="sesame",
        log_dir=str(tmp_path),
    )
    with serving_cluster(config, ["--num-kv-blocks", "64"]) as c:
        c.wait_ready(180)
        bad = openai.OpenAI(base_url=config.base_url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=config.base_url, api_key="sesame", max_retries=0)
        model = good.models.list().data[0].id
        assert good.completions.create(model=model, prompt="hi", max_tokens=2).choices


def test_killed_instance_leaves_rotation_and_its_running_request_survives(
    cluster, client, engine_greedy
):
    """SIGKILL the instance in the middle of a streamed request: the stream goes on from
    the next token on the other instance, and the text is the one the engine alone gives."""
    c, config = cluster
    assert len(cluster_state(config)["instances"]) == 2
    model = client.models.list().data[0].id
    max_tokens = 2000
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
            if len(streamed) >= 20:
                started.set()

    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(stream)
        if not started.wait(180):
            future.result(timeout=1)  # its exception, if it failed
            raise AssertionError(f"the stream did not start: {streamed}")
        running = wait_for(
            lambda: [i for i in cluster_state(config)["instances"] if i["load"]["num_running"]],
            10,
            "a heartbeat showing the request running",
        )
        assert len(running) == 1 and not future.done(), running
        victim = running[0]["instance_id"]
        os.kill(c.processes[victim].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        wait_for(lambda: len(cluster_state(config)["instances"]) == 1, 10, "the victim to leave")
        assert time.monotonic() - killed_at < 5
        future.result(timeout=300)

    expected = engine_greedy(engine_greedy.tokenizer.encode(PROMPT), max_tokens)
    assert "".join(streamed) == engine_greedy.tokenizer.decode(expected)
    assert cluster_state(config)["num_redispatched"] == 1
    for _ in range(4):  # and new requests go to the survivor
        response = client.completions.create(model=model, prompt=PROMPT, max_tokens=5)
        assert response.choices[0].finish_reason in ("length", "stop")
