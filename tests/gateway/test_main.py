"""`python -m services.gateway` as a real process: flags, serving, clean exit on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import nats
import openai
import pytest

from services.gateway.__main__ import main
from tests.gateway.conftest import free_port
from tests.gateway.fake_cluster import FakeCluster, Script


def test_bad_flags_exit_with_a_message(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--port", "8000"])  # no --model
    assert e.value.code == 2
    assert "--model" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.asyncio(loop_scope="function")
async def test_process_serves_and_stops(nats_url, model_info):
    nc = await nats.connect(nats_url)
    tok = model_info.tokenizer
    cluster = FakeCluster(
        nc,
        "m",
        plan=lambda req: Script(tokens=[[*tok.encode("Hi!"), tok.token_to_id("<|im_end|>")]]),
    )
    await cluster.start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("XLLM_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "services.gateway", "--model", model_info.path, "--served-model-name", "m"),
        *("--host", "127.0.0.1", "--port", str(port), "--nats-url", nats_url),
        env=env | {"XLLM_API_KEY": "k", "XLLM_LOG_LEVEL": "WARNING"},
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(f"{base}/health") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the gateway did not become healthy")
        client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="k", max_retries=0)
        r = await client.completions.create(model="m", prompt="x", max_tokens=5)
        assert r.choices[0].text == "Hi!"
        await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await cluster.stop()
        await nc.close()
