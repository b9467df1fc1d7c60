"""Offline jobs over NATS on the real `xllm up`: published with nats-py (and `xllm jobs`),
run at low priority, one stored result each, across SIGKILLs of the scheduler and an
instance and a restart of nats-server itself (JetStream on file storage).

50 well-formed jobs, each asking for an exact number of tokens, all come back with exactly
that many; a re-published job id is not run again; malformed jobs get error results, not a
crash or a redelivery loop; the gateway finished each job exactly once.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import nats
import pytest

from tests.e2e.xllm_up import REPO, XllmUp, wait_restarted
from xllm.protocol import subjects

pytestmark = pytest.mark.slow

NUM_JOBS = 50
RESULTS_TIMEOUT = 300.0


def job(i: int) -> dict:
    """Job i: completions or chat, 16..31 tokens exactly."""
    n = 16 + i % 16
    common = {"max_tokens": n, "min_tokens": n, "ignore_eos": True, "custom_id": f"c-{i}"}
    if i % 2:
        messages = [{"role": "user", "content": f"Question {i}: why is the sky blue?"}]
        return common | {"endpoint": "/v1/chat/completions", "messages": messages}
    return common | {"endpoint": "/v1/completions", "prompt": f"Story number {i} begins"}


async def publish(js, i: int, body: dict | bytes) -> bool:
    """Publish job-<i>; True if JetStream took it as a duplicate."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    ack = await js.publish(subjects.OFFLINE_SUBMIT, data, headers={"Nats-Msg-Id": f"job-{i}"})
    return bool(ack.duplicate)


async def stored_results(js) -> int:
    try:
        return (await js.stream_info(subjects.OFFLINE_RESULTS_STREAM)).state.messages
    except Exception:  # nats-server restarting
        return -1


async def wait_results(js, at_least: int, timeout: float = RESULTS_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while await stored_results(js) < at_least:
        assert time.monotonic() < deadline, f"fewer than {at_least} results in {timeout:g}s"
        await asyncio.sleep(0.25)


async def result(js, job_id: str) -> dict:
    msg = await js.get_last_msg(subjects.OFFLINE_RESULTS_STREAM, subjects.offline_result(job_id))
    return json.loads(msg.data)


def offline_jobs_finished(up: XllmUp) -> dict[str, float]:
    with urllib.request.urlopen(up.base + "/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = r'^xllm_offline_jobs_total\{outcome="(\w+)"\} ([0-9.]+)$'
    return {m[1]: float(m[2]) for m in re.finditer(pattern, text, re.M)}


def test_offline_jobs_survive_kills_and_a_nats_restart(tiny_model_dir, tmp_path):
    up = XllmUp(
        tiny_model_dir("qwen3", "float32"), tmp_path / "logs", "--instances", "2",
        instance_ids=("inst-0", "inst-1"),
    )  # fmt: skip
    try:
        up.wait_ready()
        asyncio.run(_scenario(up, tmp_path))
        finished = offline_jobs_finished(up)
    finally:
        up.stop()
    assert finished == {"ok": NUM_JOBS, "error": 3}  # each job finished exactly once


async def _scenario(up: XllmUp, tmp_path) -> None:
    nc = await nats.connect(up.nats_url, max_reconnect_attempts=-1, reconnect_time_wait=0.25)
    js = nc.jetstream()
    try:
        for i in range(15):
            await publish(js, i, job(i))
        await wait_results(js, 5)
        os.kill(up.processes()["scheduler"]["pid"], signal.SIGKILL)
        for i in range(15, 30):
            await publish(js, i, job(i))
        assert await publish(js, 3, job(3))  # a re-send of a job id: dropped by JetStream
        await asyncio.to_thread(wait_restarted, up, "scheduler", 1)
        await wait_results(js, 18)
        old_run = up.runs()["inst-0"]
        os.kill(up.processes()["inst-0"]["pid"], signal.SIGKILL)  # with jobs running on it
        for i in range(30, 40):
            await publish(js, i, job(i))
        await asyncio.to_thread(wait_restarted, up, "inst-0", 1, old_run)
        await wait_results(js, 28)
        os.kill(up.processes()["nats-server"]["pid"], signal.SIGKILL)
        await asyncio.to_thread(wait_restarted, up, "nats-server", 1)
        # The last 10 jobs and three malformed ones, from the shell, after the restart.
        lines = [json.dumps(job(i) | {"job_id": f"job-{i}"}) for i in range(40, NUM_JOBS)]
        lines += ['{"job_id": "bad-json", "prompt": ', '{"job_id": "bad-endpoint", "prompt": "x"}']
        lines += [json.dumps({"job_id": "bad-param", "endpoint": "/v1/completions", "prompt": "x",
                              "max_tokens": -1})]  # fmt: skip
        (tmp_path / "jobs.jsonl").write_text("\n".join(lines) + "\n")
        submitted = _xllm("jobs", "submit", str(tmp_path / "jobs.jsonl"), "--nats-url", up.nats_url)
        assert len(submitted.splitlines()) == 13
        await wait_results(js, NUM_JOBS + 3)
        await asyncio.sleep(2.0)  # a second run would store nothing new, but would count
        assert await stored_results(js) == NUM_JOBS + 3
        for i in range(NUM_JOBS):
            line = await result(js, f"job-{i}")
            n = job(i)["max_tokens"]
            assert line["response"]["status_code"] == 200, line
            assert line["response"]["body"]["usage"]["completion_tokens"] == n, line
            assert line["custom_id"] == f"c-{i}" and line["error"] is None
        by_id = {}
        for job_id in ("bad-endpoint", "bad-param"):
            by_id[job_id] = await result(js, job_id)
        assert by_id["bad-endpoint"]["response"]["status_code"] == 400
        assert by_id["bad-endpoint"]["error"]["code"] == "invalid_job"
        assert by_id["bad-param"]["response"]["status_code"] == 400
        assert "max_tokens" in by_id["bad-param"]["response"]["body"]["error"]["message"]
        bad_json = [json.loads(s)["job_id"] for s in submitted.splitlines()][10]
        assert (await result(js, bad_json))["error"]["code"] == "invalid_job"
    finally:
        await nc.close()
    shown = _xllm("jobs", "results", "--job", "job-7", "--nats-url", up.nats_url)
    assert json.loads(shown)["custom_id"] == "c-7"


def _xllm(*args: str) -> str:
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO)])}
    done = subprocess.run(
        [sys.executable, "-m", "xllm.cli", *args], capture_output=True, text=True, env=env,
        timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_batch_survives_a_gateway_restart(tiny_model_dir, tmp_path):
    """The official client runs a batch; the gateway is SIGKILLed mid-way and restarted by
    the supervisor; the batch still completes with one output line per custom_id."""
    import io

    import openai

    up = XllmUp(tiny_model_dir("qwen3", "float32"), tmp_path / "logs", "--instances", "1")
    try:
        up.wait_ready()
        client = openai.OpenAI(base_url=up.base + "/v1", api_key="unused", max_retries=0)
        lines = [
            {"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
             "body": {"prompt": f"tell me about {i}", "max_tokens": 48, "min_tokens": 48,
                      "ignore_eos": True}}
            for i in range(20)
        ]  # fmt: skip
        lines[5]["body"]["temperature"] = -3  # an invalid request: the error file
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        uploaded = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/completions", completion_window="24h"
        )
        while client.batches.retrieve(batch.id).request_counts.completed < 3:
            time.sleep(0.2)
        os.kill(up.processes()["gateway"]["pid"], signal.SIGKILL)
        wait_restarted(up, "gateway", 1)
        deadline = time.monotonic() + RESULTS_TIMEOUT
        while (done := client.batches.retrieve(batch.id)).status != "completed":
            assert done.status in ("in_progress", "finalizing"), done
            assert time.monotonic() < deadline, done
            time.sleep(0.5)
        output = [
            json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()
        ]
        errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]
    finally:
        up.stop()
    assert sorted(o["custom_id"] for o in output) == sorted(f"r{i}" for i in range(20) if i != 5)
    assert all(o["response"]["body"]["usage"]["completion_tokens"] == 48 for o in output)
    assert [e["custom_id"] for e in errors] == ["r5"]
    assert (done.request_counts.completed, done.request_counts.failed) == (19, 1)
