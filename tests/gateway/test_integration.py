"""The gateway in-process on a real nats-server, driven by the official `openai` client.

The scheduler and the instance are a test double (`FakeCluster`) on the same bus: it places
every request on "test-inst", streams scripted token deltas and records aborts.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import aiohttp
import nats
import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from services.gateway.model import ModelInfo
from services.gateway.streaming import Generation, GenerationRequest
from tests.gateway.fake_cluster import INSTANCE, FakeCluster, Script
from xllm.protocol import (
    ErrorCode,
    ErrorInfo,
    InstanceLost,
    ProtocolError,
    SamplingParams,
    encode,
    subjects,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

KEY = "sk-test"
MODEL = "tiny"
TEXTS = ["Hello world, this is completion zero.", "Bonjour le monde, ça va? 世界 🎉"]


@dataclass
class Env:
    cluster: FakeCluster
    server: TestServer
    model: ModelInfo
    client: openai.AsyncOpenAI
    gateway_nc: object

    def url(self, path: str) -> str:
        return str(self.server.make_url(path))

    def tokens(self, index: int) -> list[int]:
        tok = self.model.tokenizer
        return tok.encode(TEXTS[index]) + [tok.token_to_id("<|im_end|>")]

    def default_plan(self, req) -> Script:
        return Script(tokens=[self.tokens(0), self.tokens(1)])


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(nats_url, model_info):
    cluster_nc = await nats.connect(nats_url)
    gateway_nc = await nats.connect(nats_url)
    cluster = FakeCluster(cluster_nc, MODEL, plan=lambda req: None)
    await cluster.start()
    config = GatewayConfig(
        model=model_info.path,
        served_model_name=MODEL,
        api_key=KEY,
        max_body_bytes=64 * 1024,
        max_inflight=3,
        request_timeout=10.0,
        submit_timeout=2.0,
        placement_wait=1.0,
        cluster_timeout=0.5,
    )
    server = TestServer(create_app(config, gateway_nc, model_info))
    await server.start_server()
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key=KEY, max_retries=0, timeout=10
    )
    env = Env(cluster, server, model_info, client, gateway_nc)
    yield env
    await client.close()
    await server.close()
    await cluster.stop()
    await gateway_nc.close()
    await cluster_nc.close()


@pytest.fixture(autouse=True)
def default_script(env):
    env.cluster.plan = env.default_plan


def slow_plan(req) -> Script:
    return Script(tokens=[list(range(300, 600))], delay=0.02)


async def test_completion(env):
    r = await env.client.completions.create(model=MODEL, prompt="Say hello", max_tokens=50)
    assert r.id.startswith("cmpl-") and r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == TEXTS[0]
    assert r.choices[0].finish_reason == "stop"
    prompt = env.model.tokenizer.encode("Say hello")
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == len(env.tokens(0))
    assert r.usage.total_tokens == len(prompt) + len(env.tokens(0))
    assert r.usage.prompt_tokens_details.cached_tokens == 2
    submit = env.cluster.submits[-1]
    assert submit.request_id == r.id and submit.request.model == MODEL
    assert submit.request.prompt_token_ids == prompt and submit.request.sampling.max_tokens == 50
    await asyncio.sleep(0.05)
    assert r.id not in env.cluster.aborts  # finished normally: nothing to abort


async def test_completion_defaults_max_tokens_to_the_rest_of_the_context(env):
    await env.client.completions.create(model=MODEL, prompt=[1, 2, 3])
    assert env.cluster.submits[-1].request.sampling.max_tokens == env.model.max_model_len - 3


async def test_completion_length(env):
    r = await env.client.completions.create(model=MODEL, prompt="x", max_tokens=3)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].text == env.model.tokenizer.decode(env.tokens(0)[:3])


async def test_completion_stream_with_usage(env):
    stream = await env.client.completions.create(
        model=MODEL,
        prompt="Say hello",
        max_tokens=50,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(texts) == TEXTS[0]
    assert len(texts) > 3  # streamed piece by piece
    assert finish == "stop"
    assert usage.completion_tokens == len(env.tokens(0))


async def test_chat(env):
    messages = [{"role": "user", "content": "hi there"}]
    r = await env.client.chat.completions.create(model=MODEL, messages=messages, max_tokens=50)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == TEXTS[0]
    expected = env.model.tokenizer.encode_chat(messages)
    assert env.cluster.submits[-1].request.prompt_token_ids == expected
    assert r.usage.prompt_tokens == len(expected)


async def test_chat_stream(env):
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=50, stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXTS[0]
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_n2(env):
    r = await env.client.completions.create(model=MODEL, prompt="x", max_tokens=60, n=2)
    assert [c.index for c in r.choices] == [0, 1]
    assert [c.text for c in r.choices] == TEXTS  # the second one has split multi-byte chars
    assert r.usage.completion_tokens == len(env.tokens(0)) + len(env.tokens(1))
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], n=2, stream=True
    )
    texts = ["", ""]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == TEXTS


async def test_stop_string_cuts_text_and_aborts(env):
    r = await env.client.completions.create(
        model=MODEL, prompt="x", max_tokens=50, stop=["xx", "is comp"]
    )
    assert r.choices[0].text == "Hello world, this "
    assert r.choices[0].finish_reason == "stop"
    assert await env.cluster.wait_abort(r.id)
    r = await env.client.completions.create(
        model=MODEL, prompt="x", stop="world,", extra_body={"include_stop_str_in_output": True}
    )
    assert r.choices[0].text == "Hello world,"


async def test_stop_string_in_stream(env):
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stop=["world, th"], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hello "
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert await env.cluster.wait_abort(chunks[0].id)


async def test_client_disconnect_aborts(env):
    env.cluster.plan = slow_plan
    stream = await env.client.completions.create(
        model=MODEL, prompt="x", max_tokens=300, stream=True
    )
    ids = []
    async for chunk in stream:
        ids.append(chunk.id)
        if len(ids) == 3:
            break
    await stream.close()
    assert await env.cluster.wait_abort(ids[0])


async def test_logprobs(env):
    r = await env.client.completions.create(model=MODEL, prompt="x", max_tokens=4, logprobs=2)
    lp = r.choices[0].logprobs
    tokens = env.tokens(0)[:4]
    assert lp.tokens == [env.model.token_text(t) for t in tokens]
    assert lp.token_logprobs == [-0.5] * 4
    assert all(len(top) == 2 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset[1] == len(lp.tokens[0])
    r = await env.client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
    )
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [env.model.token_text(t) for t in tokens]
    assert [len(c.top_logprobs) for c in content] == [2] * 4
    assert content[0].top_logprobs[0].logprob == -0.5


def _error(e: openai.APIStatusError) -> dict:
    body = e.body
    return body.get("error", body) if isinstance(body, dict) else {}


async def test_errors_are_openai_bodies(env):
    client = env.client
    with pytest.raises(openai.NotFoundError) as e:
        await client.completions.create(model="nope", prompt="x")
    assert _error(e.value)["param"] == "model"
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=-1)
    assert _error(e.value)["param"] == "max_tokens"
    assert _error(e.value)["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=MODEL, prompt="x", max_tokens=10**9)
    assert _error(e.value)["code"] == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    with pytest.raises(openai.BadRequestError) as e:
        await client.completions.create(model=MODEL, prompt=[5] * env.model.max_model_len)
    assert _error(e.value)["code"] == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    wrong = openai.AsyncOpenAI(base_url=client.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        await wrong.models.list()
    assert _error(e.value)["code"] == ErrorCode.UNAUTHORIZED
    await wrong.close()
    r = await client.completions.create(model=MODEL, prompt="still serving", max_tokens=50)
    assert r.choices[0].text == TEXTS[0]


async def test_bad_json_and_big_body(env):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(env.url("/v1/completions"), data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["code"] == "invalid_request"
        async with http.post(env.url("/v1/completions"), data=b"[1, 2]") as resp:
            assert resp.status == 400
        big = b'{"prompt": "' + b"a" * 100_000 + b'"}'
        async with http.post(env.url("/v1/completions"), data=big) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "request_too_large"
        async with http.get(env.url("/v1/nothing")) as resp:
            assert resp.status == 404
            assert "error" in await resp.json()


async def test_scheduler_and_instance_errors(env):
    env.cluster.plan = lambda req: Script(
        tokens=[[1]], submit_error=ErrorInfo(ErrorCode.NO_INSTANCE, "nobody home")
    )
    with pytest.raises(openai.APIStatusError) as e:
        await env.client.completions.create(model=MODEL, prompt="x")
    assert e.value.status_code == 503 and "nobody home" in _error(e.value)["message"]
    failed = ErrorInfo(ErrorCode.INSTANCE_FAILED, "the instance blew up")
    env.cluster.plan = lambda req: Script(tokens=[env.tokens(0)[:3]], stream_error=failed)
    with pytest.raises(openai.APIStatusError) as e:
        await env.client.completions.create(model=MODEL, prompt="x")
    assert e.value.status_code == 503 and _error(e.value)["code"] == "instance_failed"
    stream = await env.client.completions.create(model=MODEL, prompt="x", stream=True)
    with pytest.raises(openai.APIError, match="blew up"):
        async for _ in stream:
            pass


async def test_max_inflight_answers_429(env):
    env.cluster.plan = slow_plan
    streams = [
        await env.client.completions.create(model=MODEL, prompt="x", max_tokens=300, stream=True)
        for _ in range(3)
    ]
    with pytest.raises(openai.RateLimitError):
        await env.client.completions.create(model=MODEL, prompt="x", max_tokens=5)
    for stream in streams:
        await stream.close()
    env.cluster.plan = env.default_plan
    for _ in range(50):  # the slots free up as the handlers see the disconnects
        try:
            await env.client.completions.create(model=MODEL, prompt="x", max_tokens=5)
            break
        except openai.RateLimitError:
            await asyncio.sleep(0.05)
    else:
        pytest.fail("in-flight slots were not released")


async def test_deadline_raises_timeout_and_aborts(env):
    env.cluster.plan = slow_plan
    req = GenerationRequest(
        request_id="cmpl-deadline",
        model=MODEL,
        prompt_token_ids=[1, 2],
        sampling=SamplingParams(max_tokens=300),
    )
    gen = Generation(env.gateway_nc, env.model, req, submit_timeout=2, timeout=0.2)
    with pytest.raises(ProtocolError) as e:
        async with gen:
            async for _ in gen.outputs():
                pass
    assert e.value.code == ErrorCode.TIMEOUT
    assert await env.cluster.wait_abort("cmpl-deadline")


async def test_models_tokenize_detokenize(env):
    models = await env.client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    headers = {"Authorization": f"Bearer {KEY}"}
    tok = env.model.tokenizer
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(env.url("/tokenize"), json={"prompt": "hello world"}) as resp:
            body = await resp.json()
        assert body["tokens"] == tok.encode("hello world")
        assert body["count"] == len(body["tokens"])
        assert body["max_model_len"] == env.model.max_model_len
        messages = [{"role": "user", "content": "hi"}]
        async with http.post(env.url("/tokenize"), json={"messages": messages}) as resp:
            assert (await resp.json())["tokens"] == tok.encode_chat(messages)
        tokens = tok.encode("héllo 世界")
        async with http.post(env.url("/detokenize"), json={"tokens": tokens}) as resp:
            assert (await resp.json()) == {"prompt": "héllo 世界"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(env.url("/tokenize"), json={"prompt": "x"}) as resp,
    ):
        assert resp.status == 401


async def test_health_metrics_cluster(env):
    await env.client.completions.create(model=MODEL, prompt="x", max_tokens=5)
    async with aiohttp.ClientSession() as http:  # no API key needed here
        async with http.get(env.url("/health")) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.get(env.url("/cluster")) as resp:
            state = await resp.json()
        assert state["instances"][0]["instance_id"] == "test-inst"
        assert state["instances"][0]["role"] == "both"
        async with http.get(env.url("/metrics")) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await resp.text()
    assert 'xllm_gateway_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert "xllm_gateway_time_to_first_token_seconds_count" in text
    assert 'xllm_instance_requests_waiting{instance="test-inst",role="both"} 0' in text
    assert 'xllm_instance_spec_accepted_tokens{instance="test-inst",role="both"} 25' in text
    assert 'xllm_instance_spec_acceptance_rate{instance="test-inst",role="both"} 0.625' in text
    assert 'xllm_instance_speculating{instance="test-inst",role="both"} 1' in text
    assert 'xllm_instance_kv_host_hits{instance="test-inst",role="both"} 3' in text
    assert 'xllm_instance_kv_host_load_seconds{instance="test-inst",role="both"} 0.25' in text
    assert 'xllm_instance_expert_rebalances{instance="test-inst",role="both"} 0' in text
    assert "xllm_gateway_requests_running 0" in text


async def test_health_needs_an_instance_for_each_half_of_a_request(env):
    env.cluster.roles = ["prefill"]  # PD: the decode instance still loads
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(env.url("/health")) as resp:
                assert resp.status == 503 and resp.headers["Retry-After"] == "2"
                assert "decode" in (await resp.json())["error"]["message"]
            env.cluster.roles = ["prefill", "decode"]
            async with http.get(env.url("/health?verbose")) as resp:
                assert resp.status == 200
                body = await resp.json()
            assert sorted(body["roles"].values()) == ["decode", "prefill"]
    finally:
        env.cluster.roles = ["both"]


async def test_a_request_waits_while_no_instance_can_take_it(env):
    """A role still loading, an instance restarting: NO_INSTANCE is retried, not returned."""
    submits = []

    def plan(req):
        submits.append(req.request_id)
        if len(submits) <= 2:
            return Script(tokens=[[1]], submit_error=ErrorInfo(ErrorCode.NO_INSTANCE, "loading"))
        return env.default_plan(req)

    env.cluster.plan = plan
    r = await env.client.completions.create(model=MODEL, prompt="x", max_tokens=50)
    assert r.choices[0].text == TEXTS[0]
    assert submits == [r.id] * 3


async def test_no_instance_after_the_placement_wait_is_a_retryable_503(env):
    env.cluster.plan = lambda req: Script(
        tokens=[[1]], submit_error=ErrorInfo(ErrorCode.NO_INSTANCE, "nobody home")
    )
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": MODEL, "prompt": "x", "max_tokens": 4}
    async with (
        aiohttp.ClientSession() as http,
        http.post(env.url("/v1/completions"), json=body, headers=headers) as resp,
    ):
        assert resp.status == 503 and resp.headers["Retry-After"] == "2"
        assert (await resp.json())["error"]["code"] == "no_instance"
    assert len(env.cluster.submits) >= 3  # retried for placement_wait (1 s), then answered


async def test_health_without_scheduler_is_503(env):
    await env.cluster.stop()
    try:
        async with aiohttp.ClientSession() as http, http.get(env.url("/health")) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "no_instance"
    finally:
        env.cluster._subs.clear()
        await env.cluster.start()


async def test_a_lost_instance_resumes_the_stream_as_a_continuation(env):
    """InstanceLost mid-stream: the gateway resubmits prompt + tokens so far under a new id;
    the client's stream goes on; the old attempt's late deltas never mix in."""
    tokens = list(range(300, 340))

    def plan(req) -> Script:
        if not req.resumed:  # the first attempt streams slowly until it is "lost"
            return Script(tokens=[tokens], delay=0.05)
        done = len(req.request.prompt_token_ids) - len(prompt)
        return Script(tokens=[tokens[done:]])

    env.cluster.plan = plan
    prompt = env.model.tokenizer.encode("Count")
    stream = await env.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, stream=True, logprobs=0
    )
    received: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].logprobs:
            received += chunk.choices[0].logprobs.tokens
        if len(received) == 5:
            lost = InstanceLost(instance_id=INSTANCE)
            await env.cluster.nc.publish(subjects.INSTANCE_LOST, encode(lost))
    first, resumed = env.cluster.submits[-2:]
    assert not first.resumed and resumed.resumed
    assert resumed.request_id == f"{first.request_id}-r1"
    done = len(resumed.request.prompt_token_ids) - len(prompt)
    assert 5 <= done < 40
    assert resumed.request.prompt_token_ids == prompt + tokens[:done]
    assert resumed.request.sampling.max_tokens == 40 - done
    assert received == [env.model.tokenizer.decode([t]) for t in tokens]
    assert await env.cluster.wait_abort(first.request_id)  # the old attempt is stopped


async def test_a_loss_announced_before_the_submit_reply_still_resumes(env):
    """The instance dies right after the scheduler placed the request there: its
    InstanceLost can reach the gateway before the reply naming it. The request resumes
    (instead of waiting for tokens that never come)."""
    tokens = list(range(300, 310))
    env.cluster.plan = lambda req: (
        Script(tokens=[tokens]) if req.resumed else Script(tokens=[[]], lost_before_reply=True)
    )
    done = await asyncio.wait_for(
        env.client.completions.create(model=MODEL, prompt="x", max_tokens=10), 20
    )
    first, resumed = env.cluster.submits[-2:]
    assert not first.resumed and resumed.resumed
    assert done.usage.completion_tokens == 10


async def test_a_lost_instance_fails_a_request_with_n_above_1(env):
    env.cluster.plan = lambda req: Script(tokens=[list(range(300, 340))] * 2, delay=0.05)

    async def lose_it():
        await asyncio.sleep(0.2)
        await env.cluster.nc.publish(
            subjects.INSTANCE_LOST, encode(InstanceLost(instance_id=INSTANCE))
        )

    task = asyncio.create_task(lose_it())
    with pytest.raises(openai.APIStatusError) as err:
        await env.client.completions.create(model=MODEL, prompt="x", max_tokens=40, n=2)
    await task
    assert err.value.status_code == 503
    assert "lost" in err.value.message


async def test_multi_token_deltas_read_as_single_token_ones(env):
    """Speculative decoding's deltas carry several tokens: the same text, usage and stop
    string cut as one token per delta, plus the drafts in completion_tokens_details."""
    one = await env.client.completions.create(model=MODEL, prompt="x", max_tokens=50)
    cut_one = await env.client.completions.create(
        model=MODEL, prompt="x", max_tokens=50, stop=["is comp"]
    )
    assert one.usage.completion_tokens_details is None  # no drafts, no details
    env.cluster.plan = lambda req: Script(tokens=[env.tokens(0)], tokens_per_delta=3)
    many = await env.client.completions.create(model=MODEL, prompt="x", max_tokens=50)
    assert many.choices[0].text == one.choices[0].text and many.choices[0].finish_reason == "stop"
    assert many.usage.completion_tokens == one.usage.completion_tokens
    n = len(env.tokens(0))
    kept = n - -(-n // 3)  # all but one token of each delta
    details = many.usage.completion_tokens_details
    assert (details.accepted_prediction_tokens, details.rejected_prediction_tokens) == (kept, kept)
    cut = await env.client.completions.create(
        model=MODEL, prompt="x", max_tokens=50, stop=["is comp"]
    )
    assert cut.choices[0].text == cut_one.choices[0].text == "Hello world, this "
    assert cut.usage.completion_tokens == cut_one.usage.completion_tokens  # not the whole delta
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TEXTS[0]


WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}


def text_plan(env, text: str):
    """A script streaming `text` then EOS, as a constrained engine would."""
    tok = env.model.tokenizer
    return lambda req: Script(tokens=[tok.encode(text) + [tok.token_to_id("<|im_end|>")]])


async def test_an_invalid_schema_is_a_400_naming_the_field(env):
    bad = {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "objec"}}}
    with pytest.raises(openai.BadRequestError) as err:
        await env.client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=bad
        )
    body = err.value.body
    assert body["param"] == "response_format" and body["type"] == "invalid_request_error"
    assert "objec" in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        await env.client.completions.create(
            model=MODEL, prompt="x", extra_body={"structured_outputs": {"regex": "(a"}}
        )
    assert err.value.body["param"] == "structured_outputs"


async def test_a_json_schema_travels_to_the_scheduler(env):
    env.cluster.plan = text_plan(env, '{"city": "Paris"}')
    response_format = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    r = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], response_format=response_format
    )
    assert json.loads(r.choices[0].message.content) == {"city": "Paris"}
    structured = env.cluster.submits[-1].request.sampling.structured
    assert structured.kind == "json" and json.loads(structured.spec) == WEATHER


async def test_a_resumed_grammar_replays_the_streamed_tokens(env):
    tokens = list(range(300, 340))

    def plan(req) -> Script:
        if not req.resumed:
            return Script(tokens=[tokens], delay=0.05)
        done = len(req.request.prompt_token_ids) - len(prompt)
        return Script(tokens=[tokens[done:]])

    env.cluster.plan = plan
    prompt = env.model.tokenizer.encode("Count")
    stream = await env.client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=40, stream=True,
        extra_body={"structured_outputs": {"regex": "[a-z ]*"}},
    )  # fmt: skip
    num_chunks = 0
    async for _ in stream:
        num_chunks += 1
        if num_chunks == 5:
            lost = InstanceLost(instance_id=INSTANCE)
            await env.cluster.nc.publish(subjects.INSTANCE_LOST, encode(lost))
    first, resumed = env.cluster.submits[-2:]
    done = len(resumed.request.prompt_token_ids) - len(prompt)
    assert first.request.sampling.structured.num_replayed_tokens == 0
    assert resumed.request.sampling.structured.num_replayed_tokens == done > 0
    assert resumed.request.sampling.structured.spec == "[a-z ]*"


async def test_a_forced_tool_call_is_answered_as_tool_calls(env):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    messages = [{"role": "user", "content": "weather in Paris?"}]
    env.cluster.plan = text_plan(env, '[{"name": "get_weather", "parameters": {"city": "Paris"}}]')
    r = await env.client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, tool_choice="required"
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    env.cluster.plan = text_plan(env, '{"city": "Oslo", "days": 2}')
    named = {"type": "function", "function": {"name": "get_weather"}}
    stream = await env.client.chat.completions.create(
        model=MODEL, messages=messages, tools=tools, tool_choice=named, stream=True
    )
    chunks = [chunk async for chunk in stream]
    (last,) = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert last.choices[0].finish_reason == "tool_calls"
    (call,) = last.choices[0].delta.tool_calls
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "days": 2}
    assert json.loads(env.cluster.submits[-1].request.sampling.structured.spec) == WEATHER


async def test_a_tool_call_cut_by_max_tokens_is_plain_content(env):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    env.cluster.plan = text_plan(env, '{"city": "Paris"}')
    r = await env.client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], tools=tools,
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=3,
    )  # fmt: skip
    assert r.choices[0].finish_reason == "length" and not r.choices[0].message.tool_calls
    assert r.choices[0].message.content.startswith("{")


async def test_beam_search_answers_its_beams_with_their_cumulative_logprobs(env):
    env.cluster.plan = lambda req: Script(
        tokens=[env.tokens(0), env.tokens(1)], cumulative_logprobs=[-1.25, -2.5]
    )
    beam = {"use_beam_search": True, "beam_width": 4, "length_penalty": 0.5}
    r = await env.client.completions.create(
        model=MODEL, prompt="x", max_tokens=60, n=2, extra_body=beam
    )
    assert [c.text for c in r.choices] == TEXTS  # the stray first token is not in them
    assert [c.model_extra["cumulative_logprob"] for c in r.choices] == [-1.25, -2.5]
    assert r.usage.completion_tokens == len(env.tokens(0)) + len(env.tokens(1))
    sampling = env.cluster.submits[-1].request.sampling
    assert (sampling.use_beam_search, sampling.num_beams, sampling.length_penalty) == (
        True, 4, 0.5,
    )  # fmt: skip
    stream = await env.client.completions.create(
        model=MODEL, prompt="x", max_tokens=60, n=2, stream=True, extra_body=beam
    )
    texts, scores = ["", ""], [None, None]
    async for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            scores[choice.index] = choice.model_extra.get(
                "cumulative_logprob", scores[choice.index]
            )
    assert texts == TEXTS and scores == [-1.25, -2.5]


async def test_bad_beam_search_fields_are_a_400(env):
    with pytest.raises(openai.BadRequestError) as e:
        await env.client.completions.create(
            model=MODEL, prompt="x", n=5, extra_body={"use_beam_search": True, "beam_width": 2}
        )
    assert e.value.body["param"] == "n" and "must not exceed beam_width" in e.value.body["message"]
