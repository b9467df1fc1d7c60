"""The cost model: FLOP and byte counts, and how step time moves with batch and context."""

from __future__ import annotations

import pytest

from services.scheduler.cost_model import (
    StepShape,
    kv_transfer_time,
    load_model_config,
    step_cost,
    step_time,
)
from xllm.hardware import SPEC_PROFILES, load_profile

QWEN3_06B = load_model_config("qwen3-0.6b")
A100 = SPEC_PROFILES["a100"]


def decode(batch: int, ctx: int) -> StepShape:
    return StepShape(decode_context_lens=(ctx,) * batch)


def prefill(n: int, ctx: int = 0) -> StepShape:
    return StepShape(prefill_chunks=((n, ctx),), num_prefill_samples=1)


def test_model_shape_reads_qwen3_06b():
    m = QWEN3_06B
    shape = (m.hidden_size, m.num_hidden_layers, m.num_attention_heads, m.num_key_value_heads)
    assert (*shape, m.head_dim) == (1024, 28, 16, 8, 128)
    assert m.kv_bytes_per_token == 2 * 28 * 8 * 128 * 2
    # ~0.44B weights in the layers + 0.16B tied embedding/LM head: Qwen3-0.6B's 0.6B.
    layers = m.num_hidden_layers * (m.attn_weights + m.mlp_weights(1)[1])
    params = layers + m.hidden_size * m.vocab_size
    assert 0.55e9 < params < 0.65e9


def test_one_decode_reads_every_weight_once_and_does_two_flops_per_weight():
    cost = step_cost(QWEN3_06B, decode(1, 1))
    weights = cost.weight_bytes / 2
    assert cost.linear_flops == pytest.approx(2 * weights)


@pytest.mark.parametrize("profile", ["a100", "h100", "ascend-910b"])
def test_step_time_grows_with_batch_and_context(profile):
    hw = load_profile(profile)
    for b in (1, 8, 64):
        contexts = [step_time(QWEN3_06B, decode(b, c), hw) for c in (128, 1024, 8192)]
        assert contexts == sorted(contexts)
    batches = [step_time(QWEN3_06B, decode(b, 1024), hw) for b in (1, 4, 16, 64, 256)]
    assert batches == sorted(batches)
    prefills = [step_time(QWEN3_06B, prefill(n, 0), hw) for n in (64, 256, 1024, 4096)]
    assert prefills == sorted(prefills)
    with_context = [step_time(QWEN3_06B, prefill(256, c), hw) for c in (0, 1024, 8192)]
    assert with_context == sorted(with_context)


def test_gpu_decode_is_memory_bound_and_long_prefill_compute_bound():
    def bound(step: StepShape) -> str:
        cost = step_cost(QWEN3_06B, step)
        compute = (
            cost.linear_flops + cost.prefill_attn_flops + cost.decode_attn_flops
        ) / A100.peak("bfloat16")
        memory = (cost.weight_bytes + cost.kv_bytes) / A100.mem_bw
        return "memory" if memory > compute else "compute"

    assert bound(decode(1, 1024)) == "memory"
    assert bound(decode(32, 1024)) == "memory"
    assert bound(prefill(4096)) == "compute"


def test_batching_decodes_pays_off_on_a_gpu_but_hardly_on_this_cpu_in_bf16():
    # This CPU has no bf16 FMA units: a bf16 GEMM runs ~9 GFLOP/s on one core, so even a
    # decode step is compute-bound and 32 decodes cost ~20x one (measured: 4.9 s vs 0.23 s).
    # On an A100 the same step is memory-bound: the weights are read once for the batch.
    def ratio(hw):
        return step_time(QWEN3_06B, decode(32, 128), hw) / step_time(QWEN3_06B, decode(1, 128), hw)

    assert ratio(load_profile("cpu-local")) > 10
    assert ratio(A100) < 2


def test_faster_hardware_is_faster():
    step = StepShape(decode_context_lens=(2048,) * 16, prefill_chunks=((512, 0),))
    a100, h100 = (step_time(QWEN3_06B, step, load_profile(n)) for n in ("a100", "h100"))
    assert h100 < a100


def test_kv_transfer_time_is_latency_plus_bytes_over_bandwidth():
    t1, t2 = (kv_transfer_time(QWEN3_06B, n, A100) for n in (1000, 2000))
    assert t2 - t1 == pytest.approx(1000 * QWEN3_06B.kv_bytes_per_token / A100.interconnect_bw)
    assert t1 > A100.transfer_latency
