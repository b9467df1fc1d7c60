"""The simulator's measured serving overheads (sim/serving.py): each adds what it says
where it says, and `fit_overheads` reads them back from one request's times."""

from __future__ import annotations

import pytest

from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import get_policy
from services.scheduler.sim.instance import InstanceSpec, SimRequest
from services.scheduler.sim.serving import Probe, ServingOverheads, fit_overheads
from services.scheduler.sim.simulator import ClusterSpec, Simulator
from xllm.hardware import SPEC_PROFILES

MODEL = load_model_config("qwen3-8b")
HW = SPEC_PROFILES["a100"]
SPEC = InstanceSpec(num_kv_blocks=4096, block_size=16, max_num_batched_tokens=2048)
PROMPT = 1000
SPLIT = ("prefill", "decode")
OVERHEADS = ServingOverheads(request=0.03, prefill_hop=0.01, handoff=0.2, step=0.005)


NONE = ServingOverheads()


def run(roles, overheads=NONE, requests=((0.0, 8),)):
    """(first token, finish) of each request (arrival, output tokens), least-load."""
    cluster = ClusterSpec(roles, SPEC, overheads=overheads)
    sim = Simulator(MODEL, HW, cluster, get_policy("least-load"))
    reqs = [SimRequest(f"r{i}", t, PROMPT, out) for i, (t, out) in enumerate(requests)]
    return [(r.first_token_at, r.finished_at) for r in sim.run(reqs)]


def test_each_overhead_adds_its_seconds_where_it_says():
    ((first, end),) = run(SPLIT)
    with_request = run(SPLIT, ServingOverheads(request=0.03))[0]
    assert with_request == pytest.approx((first + 0.03, end + 0.03))  # TTFT and all after
    with_hop = run(SPLIT, ServingOverheads(prefill_hop=0.01))[0]
    assert with_hop == pytest.approx((first + 0.01, end + 0.01))
    with_handoff = run(SPLIT, ServingOverheads(handoff=0.2))[0]
    assert with_handoff == pytest.approx((first, end + 0.2))  # after the first token only
    ((first, end),) = run(("both",))
    with_step = run(("both",), ServingOverheads(step=0.005))[0]
    assert with_step == pytest.approx((first + 0.005, end + 8 * 0.005))  # 8 steps: 1 + 7
    assert run(("both",), ServingOverheads(prefill_hop=1.0, handoff=1.0))[0] == (first, end)


def test_instances_sharing_fewer_cores_than_are_busy_step_slower():
    two = ((0.0, 50), (0.0, 50))  # one on each instance, stepping at the same time
    alone = max(end for _, end in run(("both", "both"), requests=two))
    for cores, factor in ((2, 1.0), (4, 1.0), (1, 2.0)):
        shared = max(end for _, end in run(("both", "both"), ServingOverheads(cores=cores), two))
        # The factor is fixed when a step starts: the first instance's first step, started
        # while the other was idle, is not stretched.
        assert factor * alone * 0.97 <= shared <= factor * alone * 1.0001, cores


def test_the_fit_reads_the_overheads_back_from_one_requests_times():
    """A probe made of the simulator's own times (with OVERHEADS) fits back to OVERHEADS."""

    def probe(roles, overheads):
        (first, two), (_, three) = (run(roles, overheads, ((0.0, n),))[0] for n in (2, 3))
        return Probe(PROMPT, first, (two - first, three - two), split=len(roles) == 2)

    whole = ServingOverheads(request=OVERHEADS.request, step=OVERHEADS.step)
    fitted_whole = fit_overheads([probe(("both",), whole)], MODEL, HW, 2048, cores=2)
    assert fitted_whole.cores == 2
    assert (fitted_whole.request, fitted_whole.step) == pytest.approx((0.03, 0.005), abs=1e-4)
    assert (fitted_whole.prefill_hop, fitted_whole.handoff) == (0.0, 0.0)
    fitted = fit_overheads([probe(SPLIT, OVERHEADS)], MODEL, HW, 2048, whole=fitted_whole)
    assert fitted.request == fitted_whole.request
    assert (fitted.prefill_hop, fitted.handoff, fitted.step) == pytest.approx(
        (0.01, 0.2, 0.005), abs=1e-4
    )
