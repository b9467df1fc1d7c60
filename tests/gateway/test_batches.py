"""OpenAI's Files and Batch API, driven by the official `openai` client.

The gateway in-process on its own real nats-server (JetStream: the object store, the
key-value bucket and the offline job streams are real); the scheduler and instance are the
`FakeCluster` double, so each request's answer is known. A restart of the gateway process
in the middle of a batch is in tests/e2e/test_offline_jobs.py.
"""

from __future__ import annotations

import asyncio
import io
import json

import nats
import openai
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer

from services.gateway.app import create_app
from services.gateway.config import GatewayConfig
from tests.gateway.fake_cluster import FakeCluster, Script
from xllm.cli.cluster.embedded import start_nats

pytestmark = pytest.mark.asyncio(loop_scope="module")

MODEL = "tiny"


@pytest.fixture(scope="module")
def own_nats_url():
    with start_nats() as server:  # its own JetStream: no streams from other tests
        yield server.url


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(own_nats_url, model_info):
    cluster_nc = await nats.connect(own_nats_url)
    gateway_nc = await nats.connect(own_nats_url)
    cluster = FakeCluster(cluster_nc, MODEL, plan=lambda req: Script(tokens=[[11, 12, 13]]))
    await cluster.start()
    config = GatewayConfig(model=model_info.path, served_model_name=MODEL, placement_wait=0.5)
    server = TestServer(create_app(config, gateway_nc, model_info))
    await server.start_server()
    client = openai.AsyncOpenAI(
        base_url=str(server.make_url("/v1")), api_key="unused", max_retries=0, timeout=10
    )
    yield client, cluster
    await client.close()
    await server.close()
    await cluster.stop()
    await gateway_nc.close()
    await cluster_nc.close()


def batch_file(lines: list[dict]) -> io.BytesIO:
    return io.BytesIO("".join(json.dumps(line) + "\n" for line in lines).encode())


def chat_line(i: int, **body) -> dict:
    messages = [{"role": "user", "content": f"question {i}"}]
    return {
        "custom_id": f"req-{i}",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": messages, "max_tokens": 3} | body,
    }


async def wait_done(client, batch_id: str, timeout: float = 30.0):
    for _ in range(int(timeout / 0.2)):
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            return batch
        await asyncio.sleep(0.2)
    pytest.fail(f"batch {batch_id} still {batch.status}")


async def test_a_batch_runs_to_an_output_and_an_error_file(env):
    client, cluster = env
    lines = [chat_line(i) for i in range(20)]
    lines[7] = chat_line(7, max_tokens=-1)  # reaches the queue, fails validation there
    uploaded = await client.files.create(file=("in.jsonl", batch_file(lines)), purpose="batch")
    assert uploaded.object == "file" and uploaded.purpose == "batch"
    assert uploaded.bytes == len(batch_file(lines).getvalue())
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.status == "validating" and batch.object == "batch"
    done = await wait_done(client, batch.id)
    assert done.status == "completed" and done.completed_at >= done.created_at
    assert (done.request_counts.total, done.request_counts.completed) == (20, 19)
    assert done.request_counts.failed == 1
    output = [
        json.loads(x)
        for x in (await client.files.content(done.output_file_id)).text.split("\n")
        if x
    ]
    assert sorted(o["custom_id"] for o in output) == sorted(f"req-{i}" for i in range(20) if i != 7)
    for line in output:
        body = line["response"]["body"]
        assert line["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["usage"]["completion_tokens"] == 3 and line["error"] is None
    errors = [
        json.loads(x)
        for x in (await client.files.content(done.error_file_id)).text.split("\n")
        if x
    ]
    assert [e["custom_id"] for e in errors] == ["req-7"]
    assert errors[0]["response"]["status_code"] == 400
    assert "max_tokens" in errors[0]["response"]["body"]["error"]["message"]
    assert all(s.request.priority == 1 for s in cluster.submits[-19:])  # offline: below online work
    listed = await client.batches.list(limit=5)
    assert done.id in [b.id for b in listed.data]


async def test_a_malformed_input_file_fails_the_batch_with_line_errors(env):
    client, _ = env
    lines = [chat_line(0), chat_line(1) | {"url": "/v1/completions"}]
    data = batch_file(lines).getvalue() + b"{not json\n"
    uploaded = await client.files.create(file=("bad.jsonl", io.BytesIO(data)), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done = await wait_done(client, batch.id)
    assert done.status == "failed" and done.failed_at is not None
    assert [e.line for e in done.errors.data] == [2, 3]


async def test_cancel_answers_the_jobs_not_yet_run(env):
    client, cluster = env
    cluster.plan = lambda req: Script(tokens=[[11, 12, 13]], delay=0.3)  # ~1 s a request
    try:
        lines = [chat_line(i) for i in range(30)]
        uploaded = await client.files.create(file=("c.jsonl", batch_file(lines)), purpose="batch")
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        await asyncio.sleep(1.5)
        cancelling = await client.batches.cancel(batch.id)
        assert cancelling.status in ("cancelling", "validating", "in_progress")
        done = await wait_done(client, batch.id)
    finally:
        cluster.plan = lambda req: Script(tokens=[[11, 12, 13]])
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts.completed < 30  # not everything ran


async def test_files_can_be_read_and_deleted_and_unknown_ids_are_404(env):
    client, _ = env
    uploaded = await client.files.create(
        file=("x.jsonl", batch_file([chat_line(0)])), purpose="batch"
    )
    assert (await client.files.retrieve(uploaded.id)).filename == "x.jsonl"
    deleted = await client.files.delete(uploaded.id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(uploaded.id)
    with pytest.raises(openai.NotFoundError):
        await client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):
        await client.files.create(file=("x.jsonl", batch_file([])), purpose="fine-tune")
