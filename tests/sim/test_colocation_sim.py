"""Online/offline co-location in the simulator: an offline backlog beside online traffic on
a PD cluster. With the co-location rules, online SLO attainment stays where it is without
the backlog while offline work gets done; admitting offline decode to every decode instance
instead loses online attainment, once through TPOT (decode steps grow past the target) and
once through KV (offline reservations hold the decode instances' blocks)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import colocation, get_policy
from services.scheduler.rebalance import flip_config
from services.scheduler.sim.backlog import OfflineBacklog, sharegpt_backlog
from services.scheduler.sim.instance import InstanceSpec, SimRequest
from services.scheduler.sim.report import SimReport, Slo, summarize
from services.scheduler.sim.simulator import ClusterSpec, Simulator
from xllm.hardware import SPEC_PROFILES

MODEL = load_model_config("qwen3-8b")
HW = SPEC_PROFILES["a100"]
ROLES = ("prefill",) * 2 + ("decode",) * 2
A100_POOL = 24_102
"""KV blocks of 16 tokens an A100-80GB holds for qwen3-8b (`run.kv_tokens`)."""


@dataclass(frozen=True)
class Case:
    slo_tpot: float
    num_kv_blocks: int
    slo_ttft: float = 1.0

    def run(self, with_backlog: bool) -> SimReport:
        """5 req/s of 2,000-token prompts, 300 tokens out, for 15 s (the online trace), and
        beside it a backlog of 3,000-token prompts, 256 tokens out, 128 at a time."""
        spec = InstanceSpec(num_kv_blocks=self.num_kv_blocks, max_num_batched_tokens=2048)
        config = SchedulerConfig(
            policy="least-load", slo_ttft=self.slo_ttft, slo_tpot=self.slo_tpot
        )
        sim = Simulator(
            MODEL, HW, ClusterSpec(ROLES, spec), get_policy("least-load"),
            targets=flip_config(config),
        )  # fmt: skip
        online = [SimRequest(f"r{i}", i / 5, 2000, 300) for i in range(75)]
        backlog = OfflineBacklog(sharegpt_backlog(1000, (256, 256), input_len=3000), 128)
        done = sim.run(online, backlog=backlog if with_backlog else None)
        return summarize("least-load", done, sim.instances, Slo(self.slo_ttft, self.slo_tpot))


TPOT_BOUND = Case(slo_tpot=0.018, num_kv_blocks=A100_POOL)
"""Unloaded decode steps take ~15 ms: a tight target, which offline decodes could break."""
KV_BOUND = Case(slo_tpot=0.020, num_kv_blocks=8192)
"""A third of the pool: offline reservations could fill the decode instances."""


@pytest.fixture
def admit_everywhere(monkeypatch):
    monkeypatch.setattr(colocation, "admits_offline_decode", lambda view, request, cost: True)


@pytest.mark.parametrize("case", [TPOT_BOUND, KV_BOUND], ids=["tpot", "kv"])
def test_an_offline_backlog_leaves_online_attainment_as_it_was(case):
    alone, shared = case.run(with_backlog=False), case.run(with_backlog=True)
    assert alone.slo_attainment > 0.9
    assert shared.slo_attainment >= 0.95 * alone.slo_attainment
    assert shared.offline_done > 0 and shared.offline_tok_s > 0


@pytest.mark.parametrize("case", [TPOT_BOUND, KV_BOUND], ids=["tpot", "kv"])
def test_admitting_offline_decode_everywhere_costs_online_attainment(case, admit_everywhere):
    everywhere = case.run(with_backlog=True)
    assert everywhere.slo_attainment < 0.5
    assert everywhere.offline_tok_s > 0


def test_xllm_sim_runs_an_offline_backlog_beside_a_trace(tmp_path, capsys):
    import json

    from xllm.cli import main

    rows = [{"timestamp": 500 * i, "input_length": 700, "output_length": 20} for i in range(20)]
    trace = tmp_path / "mini_trace.jsonl"
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["sim", "--trace", str(trace), "--pd", "1:1", "--policy", "least-load,slo-pd"]
    argv += ["--profile", "a100", "--slo-ttft", "1", "--slo-tpot", "0.1"]
    argv += ["--offline-backlog", "50", "--offline-input-len", "300", "--offline-output-len", "8"]
    assert main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "offline backlog of 50 300-token prompts" in out[0]
    for result in json.loads(out[-1])["results"]:
        assert result["num_requests"] == 20 and result["slo_attainment"] == 1.0
        assert result["offline_done"] > 0 and result["offline_tok_s"] > 0
