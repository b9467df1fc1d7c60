"""An expert-parallel instance served through the whole cluster: `xllm up --expert-parallel-size 2`.

The instance is two processes (rank 0 on NATS, rank 1 following it over gloo), each
computing half of the tiny Qwen3-MoE's expert slots, with EPLB re-placing copies meanwhile.
Two concurrent chat completions get the greedy text of the engine alone in this process;
the gateway's metrics show the instance's expert stats; no KV block stays held, also after
a client hangs up mid-stream (the abort reaches every rank). When the
follower rank dies, the instance fails loudly and the supervisor restarts the group, which
serves again; stopping `xllm up` stops every rank.
"""

from __future__ import annotations

import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tests.e2e.xllm_up import XllmUp, wait_restarted

pytestmark = pytest.mark.slow

MAX_TOKENS = 24
QUESTIONS = ["Say something about foxes.", "Count to ten, slowly."]
LONG = 900  # tokens asked for by the stream the client leaves
TOP_K = 4  # experts per token in the tiny Qwen3-MoE
EP_ARGS = ["--expert-parallel-size", "2", "--num-redundant-experts", "4", "--eplb-interval", "6"]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen3-moe", "float32")


@pytest.fixture(scope="module")
def up(model_dir, tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("logs")
    cluster = XllmUp(model_dir, log_dir, "--num-threads", "1", *EP_ARGS, instance_ids=["inst-0"])
    cluster.log_dir = log_dir
    try:
        cluster.wait_ready()
        yield cluster
    finally:
        cluster.stop()


def engine_alone(model_dir: Path, question: str) -> str:
    from xllm.llm import LLM
    from xllm.protocol import SamplingParams

    llm = LLM(str(model_dir), dtype="float32", num_kv_blocks=256, max_model_len=1024)
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": question}])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    return llm.tokenizer.decode(llm.generate(prompt, params)[0].outputs[0].token_ids)


def chat(up: XllmUp, question: str) -> str:
    client = openai.OpenAI(base_url=up.base + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    r = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == MAX_TOKENS
    return r.choices[0].message.content


def concurrent_chats(up: XllmUp) -> list[str]:
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        return list(pool.map(lambda q: chat(up, q), QUESTIONS))


def metric(up: XllmUp, name: str) -> float:
    with open_url(up.base + "/metrics") as response:
        text = response.read().decode()
    values = [float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M)]
    assert values, f"{name} is not in /metrics"
    return sum(values)


def open_url(url: str):
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(url, timeout=5)


def follower_pids(instance_pid: int) -> list[int]:
    children = Path(f"/proc/{instance_pid}/task/{instance_pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def test_concurrent_chats_equal_the_engine_alone_and_show_expert_stats(up, model_dir):
    expected = [engine_alone(model_dir, q) for q in QUESTIONS]
    assert concurrent_chats(up) == expected
    assert concurrent_chats(up) == expected  # again, after EPLB had windows to re-place in
    inst = settled_instance(up)
    assert inst["kv"]["blocks_used"] == 0
    experts = inst["experts"]
    assert experts["num_slots"] == 20  # 16 experts + 4 copies, over both ranks
    assert experts["tokens_routed"] > 0
    assert experts["num_rebalances"] >= 1  # EPLB switched copies on both ranks at one step
    assert metric(up, "xllm_instance_expert_tokens_routed") > 0


def settled_instance(up: XllmUp) -> dict:
    """The instance's heartbeat once it holds no KV block (heartbeats are periodic)."""
    deadline = time.monotonic() + 15
    while True:
        (inst,) = up.get("/cluster")["instances"]
        if inst["kv"]["blocks_used"] == 0 or time.monotonic() > deadline:
            return inst
        time.sleep(0.3)


def test_a_client_hanging_up_aborts_on_every_rank(up, model_dir):
    """The abort reaches rank 1 too: no block stays held, and the ranks still agree."""
    routed_before = settled_instance(up)["experts"]["tokens_routed"]
    client = openai.OpenAI(base_url=up.base + "/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell me a long story."}],
        max_tokens=LONG,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = [chunk for chunk, _ in zip(stream, range(4), strict=False)]
    stream.close()
    assert len(chunks) == 4
    inst = settled_instance(up)
    assert inst["kv"]["blocks_used"] == 0
    experts = inst["experts"]
    tokens = (experts["tokens_routed"] - routed_before) / (experts["num_moe_layers"] * TOP_K)
    assert tokens < LONG / 2, "the request ran on instead of being aborted"
    assert concurrent_chats(up) == [engine_alone(model_dir, q) for q in QUESTIONS]


def test_a_dead_follower_restarts_the_whole_instance(up, model_dir):
    row = up.processes()["inst-0"]
    old_run = up.runs()["inst-0"]
    (follower,) = follower_pids(row["pid"])
    os.kill(follower, signal.SIGKILL)
    wait_restarted(up, "inst-0", row["restarts"] + 1, old_run)
    assert len(follower_pids(up.processes()["inst-0"]["pid"])) == 1  # a fresh rank 1
    assert concurrent_chats(up) == [engine_alone(model_dir, q) for q in QUESTIONS]
    assert "expert-parallel rank 1 exited" in (up.log_dir / "inst-0.log").read_text()


def test_stopping_xllm_up_stops_every_rank(up):
    """Last: rank 0 tells its follower to stop (the follower ignores the SIGTERM its process
    group gets) and reaps it; nothing is left running."""
    (follower,) = follower_pids(up.processes()["inst-0"]["pid"])
    up.stop()
    assert up.process.returncode == 0
    assert not alive(follower)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"
