"""Expert parallelism over torch.distributed (gloo): two processes, each computing half of
the tiny Qwen3-MoE's expert slots for every token and summing the layer outputs, give the
greedy tokens of one process holding every expert — with EPLB re-placing copies across
the ranks meanwhile (the ranks switch at the same step).

Run as a script, this module is one rank (the test spawns two)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import greedy, make_engine, run_engine

NEW_TOKENS = 16
REPO = Path(__file__).resolve().parents[2]


def prompts() -> list[list[int]]:
    """Skewed (37 token ids), so that EPLB has hot experts to copy."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 40, (20,), generator=g).tolist() for _ in range(4)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_rank(rank: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)  # both ranks compute the replicated attention identically
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    engine = make_engine(
        model_dir, expert_parallel_size=2, num_redundant_experts=4, eplb_interval=6
    )
    outputs = run_engine(engine, prompts(), greedy(NEW_TOKENS))
    stats = engine.expert_stats()
    local = [len(layer.local_slots(layer.placement)) for layer in engine.experts.layers]
    Path(out).write_text(
        json.dumps({"outputs": outputs, "rebalances": stats.num_rebalances, "local": local})
    )
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_expert_parallel_ranks_equal_one_process(tiny_model_dir, tmp_path):
    model_dir = str(tiny_model_dir("qwen3-moe"))
    port = free_port()
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO / "shared"), str(REPO)]),
    }
    logs = [open(tmp_path / f"{r}.log", "w") for r in range(2)]  # noqa: SIM115 (closed below)
    ranks = [
        subprocess.Popen(
            [sys.executable, __file__, str(r), str(port), model_dir, str(tmp_path / f"{r}.json")],
            env=env,
            stdout=logs[r],
            stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    try:
        codes = [p.wait(timeout=600) for p in ranks]
    finally:
        for p, log in zip(ranks, logs, strict=True):
            p.kill()
            log.close()
    assert codes == [0, 0], "\n".join((tmp_path / f"{r}.log").read_text()[-3000:] for r in range(2))
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]

    single = run_engine(make_engine(model_dir), prompts(), greedy(NEW_TOKENS))
    for result in results:
        assert result["outputs"] == single
        assert result["local"] == [10] * 4  # (16 experts + 4 copies) / 2 ranks, every layer
        assert result["rebalances"] >= 1
    assert results[0]["rebalances"] == results[1]["rebalances"]


if __name__ == "__main__":
    run_rank(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
