"""MoE expert load statistics and dynamic re-placement (EPLB) through the engine, on the tiny
Qwen3-MoE: a skewed workload triggers a re-placement, the copies spread the load, and the
greedy tokens stay those of the engine without balancing (itself equal to transformers,
test_engine_vs_hf.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, make_engine, run_engine

from xllm.engine import eplb
from xllm.instance.heartbeat import build_heartbeat
from xllm.protocol.codec import decode, encode
from xllm.protocol.types import Role

NEW_TOKENS = 24


@pytest.fixture(scope="module")
def moe_dir(tiny_model_dir):
    return tiny_model_dir("qwen3-moe")


def skewed_prompts() -> list[list[int]]:
    """Prompts over 37 token ids of the 4,000: their tokens crowd onto a few experts."""
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, 40, (24,), generator=g).tolist() for _ in range(8)]


def whole_run_imbalance(engine, prompts) -> tuple[dict, float]:
    """Run `prompts`; returns the outputs and max/mean tokens per expert copy over the run
    (mean over layers), from the layers' slot counters."""
    layers = engine.experts.layers
    before = [layer.slot_load.clone() for layer in layers]
    out = run_engine(engine, prompts, greedy(NEW_TOKENS))
    loads = [
        (layer.slot_load - start).tolist() for layer, start in zip(layers, before, strict=True)
    ]
    return out, sum(eplb.imbalance(load) for load in loads) / len(loads)


def test_every_step_counts_tokens_per_expert(moe_dir):
    engine = make_engine(moe_dir, enable_prefix_caching=False)
    prompts = skewed_prompts()[:3]
    run_engine(engine, prompts, greedy(NEW_TOKENS))
    stats = engine.expert_stats()
    mc = engine.model_config
    assert (stats.num_moe_layers, stats.num_experts, stats.num_slots) == (4, 16, 16)
    computed = sum(len(p) + NEW_TOKENS - 1 for p in prompts)  # the last token is not fed
    assert stats.tokens_routed == mc.num_hidden_layers * mc.num_experts_per_tok * computed
    for layer in engine.experts.layers:
        assert int(layer.expert_load.sum()) == mc.num_experts_per_tok * computed
    assert stats.num_rebalances == 0 and stats.imbalance > 1.0


def test_skewed_load_triggers_a_replacement_with_unchanged_output(moe_dir):
    plain = make_engine(moe_dir)
    balanced = make_engine(moe_dir, num_redundant_experts=8, eplb_interval=8)
    prompts = skewed_prompts()
    expected, plain_imbalance = whole_run_imbalance(plain, prompts)
    assert plain.expert_stats().num_rebalances == 0 and plain_imbalance > 1.8

    first, _ = whole_run_imbalance(balanced, prompts)  # the load is learnt, copies placed
    stats = balanced.expert_stats()
    assert stats.num_slots == 24 and stats.num_rebalances >= 1
    assert stats.predicted_imbalance < stats.imbalance_before_rebalance
    second, balanced_imbalance = whole_run_imbalance(balanced, prompts)

    assert first == expected and second == expected  # copies hold the same weights
    assert balanced_imbalance < 0.85 * plain_imbalance
    assert balanced.expert_stats().imbalance < 0.85 * plain.expert_stats().imbalance

    # The instance's heartbeat carries it to the scheduler and metrics.
    beat = build_heartbeat(
        instance_id="i", started_at=0.0, role=Role.DECODE, model="m", engine=balanced,
        role_flips=0, transport=None,
    )  # fmt: skip
    assert decode(encode(beat)).experts == balanced.expert_stats()


def test_dense_models_have_no_balancer(tiny_model_dir):
    engine = make_engine(tiny_model_dir("qwen3"))
    assert engine.experts is None and engine.expert_stats().num_slots == 0
    with pytest.raises(ValueError, match="no MoE layers"):
        make_engine(tiny_model_dir("qwen3"), num_redundant_experts=2)
