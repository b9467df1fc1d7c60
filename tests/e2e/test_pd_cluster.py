"""Prefill/decode disaggregation on real processes, KV carried by Mooncake (TCP).

`xllm up --prefill P --decode D` as a user runs it, for 1 + 1 and 2 + 2 instances: greedy
outputs equal the engine alone (colocated) token for token; the bytes the prefill
instances wrote equal the bytes the decode instances expected, which equal the prompts'
blocks; no block stays held on either side after requests finish or are aborted; a
request survives its decode instance or its prefill instance being SIGKILLed; and a
grammar (a JSON schema, a forced tool call) holds across the handoff.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.models.config import ModelConfig
from xllm.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

BLOCK_SIZE = 16
MAX_MODEL_LEN = 4096


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


@pytest.fixture(scope="module")
def engine_greedy(model_dir):
    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    llm = LLM(str(model_dir), num_kv_blocks=1024, max_model_len=MAX_MODEL_LEN)

    def run(prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [r.outputs[0].token_ids for r in llm.generate(prompts, params)]

    return run


@pytest.fixture(scope="module", params=[(1, 1), (2, 2)], ids=["1p1d", "2p2d"])
def cluster(request, model_dir, tmp_path_factory):
    prefill, decode = request.param
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        prefill=prefill,
        decode=decode,
        policy="round-robin",
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=240,
        stop_grace=5,
    )
    engine_args = ["--num-kv-blocks", "1024", "--max-model-len", str(MAX_MODEL_LEN)]
    with serving_cluster(config, engine_args) as c:
        c.wait_ready(config.ready_timeout)
        yield c, config


def state(config) -> dict:
    with urllib.request.urlopen(config.base_url.removesuffix("/v1") + "/cluster") as r:
        return json.load(r)


def wait_for(predicate, timeout: float, what: str, show=lambda: ""):
    """`predicate()`'s first truthy value; on timeout, fails with `show()` (the state seen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}: {show()}")


def totals(config) -> dict[str, int]:
    instances = state(config)["instances"]
    return {
        f"kv_{key}": sum(i["transfer"][key] for i in instances)
        for key in ("blocks_sent", "bytes_sent", "blocks_received", "bytes_received")
    } | {"blocks_held": sum(i["kv"]["blocks_used"] for i in instances)}


def holders(config) -> dict[str, int]:
    return {i["instance_id"]: i["kv"]["blocks_used"] for i in state(config)["instances"]}


def prompts(n: int, seed: int, lengths=(5, 16, 40, 123, 300, 777)) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 3000) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def complete(config, prompt: list[int], max_tokens: int) -> str:
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    response = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert response.usage.completion_tokens == max_tokens
    return response.choices[0].text


def texts_of(model_dir, outputs: list[list[int]]) -> list[str]:
    tokenizer = Tokenizer(model_dir)
    return [tokenizer.decode(tokens) for tokens in outputs]


def block_bytes(model_dir) -> int:
    config = ModelConfig.from_dir(model_dir)
    per_token = config.num_key_value_heads * config.head_dim * 4  # float32
    return 2 * config.num_hidden_layers * BLOCK_SIZE * per_token


def test_outputs_equal_colocated_and_the_kv_really_crossed(cluster, model_dir, engine_greedy):
    c, config = cluster
    batch = prompts(6, seed=len(c.processes))
    before = totals(config)
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda p: complete(config, p, 24), batch))
    assert texts == texts_of(model_dir, engine_greedy(batch, 24))

    wait_for(lambda: totals(config)["blocks_held"] == 0, 10, "every block to be released")
    after = totals(config)
    sent = {k: after[k] - before[k] for k in after}
    blocks = sum(math.ceil(len(p) / BLOCK_SIZE) for p in batch)  # distinct prompts: no hits
    assert sent["kv_blocks_sent"] == sent["kv_blocks_received"] == blocks
    assert sent["kv_bytes_sent"] == sent["kv_bytes_received"] == blocks * block_bytes(model_dir)


def test_an_aborted_stream_leaves_no_block_held(cluster):
    _, config = cluster
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    stream = client.completions.create(
        model=client.models.list().data[0].id,
        prompt=prompts(1, seed=7, lengths=(500,))[0],
        max_tokens=3000,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 5:
            break
    stream.close()
    wait_for(lambda: totals(config)["blocks_held"] == 0, 15, "the aborted request's blocks")


WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}


def test_a_json_schema_and_a_tool_call_hold_across_the_handoff(cluster):
    """The prefill instance samples the first token under the grammar, the decode instance
    continues it: sampled (temperature 1) outputs still follow the schema."""
    jsonschema = pytest.importorskip("jsonschema")
    _c, config = cluster
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "The weather?"}]
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}

    def ask(seed: int):
        return client.chat.completions.create(
            model=model, messages=messages, max_tokens=64, temperature=1.0, seed=seed,
            response_format=response_format,
        )  # fmt: skip

    with ThreadPoolExecutor(4) as pool:
        for r in pool.map(ask, range(8)):
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=400, seed=0, tools=tools,
        tool_choice="required",
    )  # fmt: skip
    assert r.choices[0].finish_reason == "tool_calls"
    for call in r.choices[0].message.tool_calls:
        assert call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), WEATHER)


DECODE_VICTIM_XFAIL = pytest.mark.xfail(
    strict=False,
    reason="open: since `xllm up` reports exits at once (InstanceExited), the busy decode "
    "instance this test kills after the module's earlier tests holds none of the gateway's "
    "requests (texts right, nothing redispatched); passes alone and without the reporter",
)


@pytest.mark.parametrize(
    "victim_role", [pytest.param("decode", marks=DECODE_VICTIM_XFAIL), "prefill"]
)
def test_a_request_survives_a_killed_instance(cluster, victim_role, engine_greedy):
    c, config = cluster
    if config.prefill < 2:
        pytest.skip("needs a spare instance of each role")
    live = [i["instance_id"] for i in state(config)["instances"] if i["role"] == victim_role]
    if len(live) < 2:
        pytest.skip(f"a {victim_role} instance was already killed")
    if victim_role == "decode":  # long decodes: the victim is caught decoding
        batch, max_tokens = prompts(6, seed=11, lengths=(1200, 700)), 200
    else:  # much prompt work: the victim is caught prefilling, even on a quiet machine
        batch, max_tokens = prompts(12, seed=12, lengths=(3500, 3000)), 32
    results: dict[int, str] = {}
    started = threading.Event()

    def run(i: int) -> None:
        started.set()
        results[i] = complete(config, batch[i], max_tokens)

    with ThreadPoolExecutor(len(batch)) as pool:
        futures = [pool.submit(run, i) for i in range(len(batch))]
        started.wait(30)
        # Kill the busiest instance of the role while the requests are in its hands.
        busy = wait_for(
            lambda: [
                i
                for i in state(config)["instances"]
                if i["role"] == victim_role
                and (i["load"]["num_running"] or i["load"]["num_waiting"])
            ],
            30,
            f"a busy {victim_role} instance",
        )
        victim = busy[0]["instance_id"]
        os.kill(c.processes[victim].pid, signal.SIGKILL)
        for f in futures:
            f.result(timeout=600)

    expected = texts_of(config.model, engine_greedy(batch, max_tokens))
    for i, text in enumerate(expected):
        assert results[i] == text, f"request {i}"
    assert state(config)["num_redispatched"] >= 1
    released = lambda: totals(config)["blocks_held"] == 0  # noqa: E731
    wait_for(released, 60, "every block to be released", lambda: holders(config))


def test_beam_search_through_the_cluster_equals_the_engine(cluster, model_dir):
    """Beams decoded on the decode instance after the handoff: the same beams, in the same
    order, with the same cumulative logprobs as the engine alone; with an item trie given
    inline every beam is an item; no block stays held."""
    from dataclasses import replace

    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    _, config = cluster
    (prompt,) = prompts(1, seed=11, lengths=(37,))
    rng = random.Random(5)
    items = [[rng.randrange(100, 3000) for _ in range(rng.randrange(2, 5))] for _ in range(300)]
    beam = {"use_beam_search": True, "beam_width": 8, "length_penalty": 0.5, "ignore_eos": True}
    client = openai.OpenAI(base_url=config.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id

    def ask(**fields):
        body = beam | fields
        return client.completions.create(model=model, prompt=prompt, n=3, max_tokens=6,
                                         extra_body=body).choices  # fmt: skip

    llm = LLM(str(model_dir), num_kv_blocks=1024, max_model_len=MAX_MODEL_LEN)
    params = SamplingParams(n=3, max_tokens=6, **beam)
    (expected,) = llm.generate([prompt], params)
    choices = ask()
    assert [ch.text for ch in choices] == [o.text for o in expected.outputs]
    assert [ch.model_extra["cumulative_logprob"] for ch in choices] == pytest.approx(
        [o.cumulative_logprob for o in expected.outputs], abs=1e-4
    )
    (constrained,) = llm.generate([prompt], replace(params, allowed_items=items))
    assert all(o.token_ids in items for o in constrained.outputs)
    choices = ask(allowed_items=items)
    assert [ch.text for ch in choices] == [o.text for o in constrained.outputs]
    with pytest.raises(openai.BadRequestError, match="item_trie 'nope' is not registered"):
        ask(item_trie="nope")
    wait_for(lambda: totals(config)["blocks_held"] == 0, 10, "every block to be released")
