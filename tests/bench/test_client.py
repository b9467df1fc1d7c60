"""The client against a scripted stand-in for *other* servers (no usage in the stream, errors):
how tokens are counted and how each failure is recorded. Our own server is tested live in
`test_bench_serve.py`."""

from __future__ import annotations

import contextlib
import json

import pytest
from aiohttp import web

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.runner import LoadConfig, WarmupFailed, run_load_async
from xllm.cli.bench.workloads import BenchRequest
from xllm.cli.cluster import free_port


async def completions(request: web.Request) -> web.StreamResponse:
    """Streams `max_tokens` one-character chunks, or misbehaves as the prompt says."""
    body = await request.json()
    mode = body["prompt"]
    if mode == "overloaded":
        return web.json_response({"error": {"message": "busy"}}, status=429)
    n = body["max_tokens"] - (mode == "short")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    if mode == "chat-role-first":  # a first chunk without text must not count as a token
        await response.write(b'data: {"choices": [{"text": ""}]}\n\n')
    for _ in range(n):
        await response.write(b'data: {"choices": [{"text": "x"}]}\n\n')
    if mode == "error-midway":
        await response.write(b'data: {"error": {"message": "instance died"}}\n\n')
    await response.write(b"data: [DONE]\n\n")
    return response


@contextlib.asynccontextmanager
async def scripted_server():
    """The stand-in server on a free port, in the test's own event loop; yields its API root."""
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def run(prompts: list[str], output_len: int = 5, warmup: int = 0):
    requests = [BenchRequest(p, 3, output_len) for p in prompts]
    load = LoadConfig(concurrency=2, progress=False, warmup=warmup, timeout=10)
    async with scripted_server() as base_url:
        return (await run_load_async(requests, ClientConfig(base_url, "m"), load)).records


async def test_without_usage_each_text_chunk_is_a_token():
    ok, role_first = await run(["fine", "chat-role-first"])
    assert (ok.error, ok.counted_by, ok.output_tokens, len(ok.itl)) == (None, "chunks", 5, 4)
    assert (role_first.error, role_first.output_tokens) == (None, 5)
    assert ok.ttft is not None and ok.tpot is not None and ok.e2e >= ok.ttft


async def test_failures_are_recorded_by_kind():
    records = await run(["short", "overloaded", "error-midway"])
    assert [r.error for r in records] == ["wrong_length", "http_429", "stream_error"]
    assert "asked for 5 tokens, got 4" in records[0].detail
    assert "busy" in records[1].detail and "instance died" in records[2].detail


async def test_a_failed_warmup_stops_the_run():
    with pytest.raises(WarmupFailed, match="http_429"):
        await run(["overloaded", "fine"], warmup=1)


def test_request_body_asks_for_the_exact_length():
    from xllm.cli.bench.client import request_body

    body = request_body(BenchRequest([5, 6], 2, 7), ClientConfig("u", "m", extra_body={"seed": 1}))
    assert (body["max_tokens"], body["min_tokens"], body["ignore_eos"]) == (7, 7, True)
    assert body["stream_options"] == {"include_usage": True}
    assert (body["prompt"], body["seed"]) == ([5, 6], 1)
    chat = request_body(BenchRequest("hi", 1, 3), ClientConfig("u", "m", chat=True))
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in chat
    assert json.dumps(chat)
