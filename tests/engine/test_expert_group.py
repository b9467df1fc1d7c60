"""An expert-parallel group in lockstep (xllm.instance.expert_group), without NATS.

Rank 0 (a subprocess running this module) starts its follower as an instance does
(`spawn_followers`: the real follower program, parsing the instance's arguments) and drives
its `GroupLeader` the way the instance loop does: requests arriving between steps, one
offline prompt too long for the inline header (the spill path; its chunks are sized by
rank 0's measured step times, which the followers must schedule by too), an abort
mid-decode, and an idle spell the keep-alives bridge. Its outputs equal one process running the same schedule; the
follower, which checks every step's output digest against rank 0's, exits 0 on the stop
message. A follower killed while rank 0 idles makes the next step raise `GroupBroken`
(and `failure()` name it) instead of hanging.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import greedy

REPO = Path(__file__).resolve().parents[2]
NEW_TOKENS = 12
LONG_PROMPT = 1500  # tokens of 3 msgpack bytes each: over HEADER_BYTES


def engine_args(model_dir: str, ep: bool) -> list[str]:
    args = ["--model", model_dir, "--dtype", "float32", "--num-kv-blocks", "256"]
    args += ["--num-threads", "1", "--max-model-len", "2048"]
    # Offline chunks of tens of tokens (priced by each rank's clock, they would differ).
    args += ["--offline-step-share", "5"]
    if ep:
        args += ["--expert-parallel-size", "2", "--num-redundant-experts", "4"]
        args += ["--eplb-interval", "6"]
    return args


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    short = [torch.randint(3, 40, (16,), generator=g).tolist() for _ in range(3)]
    long = torch.randint(300, 4000, (LONG_PROMPT,), generator=g).tolist()
    return [short[0], short[1], long, short[2]]


def drive(engine, idle: float = 0.0) -> dict[str, list[int]]:
    """The schedule both sides run: "0", then "1", then "2" (long and offline: while "0"
    and "1" decode, its prompt goes in chunks priced by measured step times), "1" aborted
    after 7 steps, an idle spell once the rest finished, then "3" alone."""
    batch = prompts()
    outputs: dict[str, list[int]] = {}

    def step() -> None:
        for delta in engine.step():
            outputs.setdefault(delta.request_id, []).extend(delta.token_ids)

    engine.add_request("0", batch[0], greedy(NEW_TOKENS))
    for i in range(7):
        if i == 1:  # a prefill after the first step: its cost per token is measured
            engine.add_request("1", batch[1], greedy(NEW_TOKENS))
        if i == 4:  # after plain decode steps, measured too: the offline budget is set
            engine.add_request("2", batch[2], greedy(NEW_TOKENS), priority=1)
        step()
    assert engine.abort_request("1")
    while engine.has_unfinished():
        step()
    time.sleep(idle)
    engine.add_request("3", batch[3], greedy(NEW_TOKENS))
    while engine.has_unfinished():
        step()
    return outputs


def run_rank0(model_dir: str, out: str, kill_follower: bool) -> None:
    from xllm.config import EngineConfig, from_args
    from xllm.engine.engine import Engine
    from xllm.instance import expert_group
    from xllm.instance.main import instance_parser

    torch.set_num_threads(1)
    expert_group.KEEPALIVE_SECONDS = 0.2  # several keep-alives in the idle spell
    args = engine_args(model_dir, ep=True)
    port, followers = expert_group.spawn_followers(2, args)
    expert_group.init_group(0, 2, port)
    engine = Engine(from_args(EngineConfig, instance_parser("both").parse_args(args)))
    leader = expert_group.GroupLeader(engine, followers)
    if kill_follower:
        os.kill(followers[0].pid, signal.SIGKILL)
        followers[0].wait()
        leader.add_request("0", prompts()[0], greedy(NEW_TOKENS))
        started = time.monotonic()
        try:
            leader.step()
            leader.step()
            raised = ""
        except expert_group.GroupBroken as e:
            raised = str(e)
        result = {"raised": raised, "seconds": time.monotonic() - started}
        result["failure"] = leader.failure()
        Path(out).write_text(json.dumps(result))
        os._exit(0)  # the group is gone: nothing to tear down cleanly
    outputs = drive(leader, idle=1.0)
    rebalances = leader.expert_stats().num_rebalances
    leader.close()
    result = {"outputs": outputs, "rebalances": rebalances, "follower": followers[0].returncode}
    Path(out).write_text(json.dumps(result))


def rank0(model_dir: str, tmp_path: Path, kill_follower: bool = False) -> dict:
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO), str(REPO / "tests")]),
        "XLLM_NATIVE_KERNELS": "0",
    }
    out, log = tmp_path / "rank0.json", tmp_path / "rank0.log"
    argv = [sys.executable, __file__, model_dir, str(out), str(int(kill_follower))]
    with open(log, "w") as f:
        code = subprocess.run(argv, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    assert code.returncode == 0, log.read_text()[-4000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_a_group_in_lockstep_equals_one_process(tiny_model_dir, tmp_path):
    from xllm.config import EngineConfig, from_args
    from xllm.engine.engine import Engine
    from xllm.instance.main import instance_parser

    model_dir = str(tiny_model_dir("qwen3-moe"))
    result = rank0(model_dir, tmp_path)
    args = instance_parser("both").parse_args(engine_args(model_dir, ep=False))
    single = drive(Engine(from_args(EngineConfig, args)))
    assert result["outputs"] == single
    assert len(single["2"]) == NEW_TOKENS and len(single["3"]) == NEW_TOKENS
    assert len(single["1"]) < NEW_TOKENS  # aborted
    assert result["follower"] == 0  # it saw rank 0's outputs every step, and the stop
    assert result["rebalances"] >= 1


@pytest.mark.slow
def test_a_dead_follower_fails_the_step_instead_of_hanging(tiny_model_dir, tmp_path):
    result = rank0(str(tiny_model_dir("qwen3-moe")), tmp_path, kill_follower=True)
    assert result["raised"], "two steps ran with the follower dead"
    assert result["seconds"] < 60  # well inside GROUP_TIMEOUT: the closed socket is seen
    assert "rank 1 exited" in result["failure"]


if __name__ == "__main__":
    run_rank0(sys.argv[1], sys.argv[2], sys.argv[3] == "1")
