"""Graph mode (--graph-mode, engine/graph_runner.py): decode-only steps through one native
call (CPU) or a captured device graph per padded batch-size bucket (CUDA/NPU).

Greedy outputs with graph mode are the eager ones token for token, at batch sizes on both
sides of bucket boundaries and in bfloat16 (the native linears) as in float32; pad rows of
a padded bucket change no real row's output and write only the spare slot; models graph
mode does not cover, or a CPU without the native kernels, fall back to eager. On CPU one
native step is the eager step to the bit (hidden states and KV pool), fused passes and all.
(test_engine_vs_hf.py runs every equality test against transformers with graph mode on.)
"""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, make_engine, random_prompts, run_engine

from xllm.engine.graph_runner import (
    batch_buckets,
    bucket_for,
    is_decode_only,
    padded_decode_inputs,
)
from xllm.engine.scheduler import ScheduledSeq
from xllm.engine.sequence import Sequence
from xllm.protocol.types import SamplingParams

NEW_TOKENS = 12


def test_buckets_cover_every_batch_size_up_to_the_largest():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(17) == [1, 2, 4, 8, 16, 24]
    assert batch_buckets(64) == [1, 2, 4] + list(range(8, 65, 8))
    buckets = batch_buckets(64)
    for n in range(1, 65):
        bucket = bucket_for(n, buckets)
        assert bucket is not None and bucket >= n
        assert bucket == min(b for b in buckets if b >= n)
    assert bucket_for(65, buckets) is None  # bigger than any capture: eager


def decode_batch(engine, lengths: list[int]):
    """Sequences of these lengths with their KV written, and the inputs of their next
    decode step (as the runner lays it out)."""
    vocab = engine.model_config.vocab_size
    items = []
    for i, prompt in enumerate(random_prompts(lengths, vocab, seed=7)):
        seq = Sequence(f"s{i}", prompt, SamplingParams())
        assert engine.block_manager.allocate(seq, len(prompt))
        seq.num_computed_tokens = len(prompt) - 1
        items.append(ScheduledSeq(seq, 1, True))
    return engine.runner._prepare(items)


def test_pad_rows_leave_real_rows_and_their_kv_unchanged(tiny_model_dir):
    # The padding a captured bucket applies, run eagerly (device-independent): the pad rows
    # write their K/V to the spare slot only, and the real rows' outputs are unchanged (to
    # rounding: a GEMM's bits may depend on its row count, on CPU as with cuBLAS).
    engine = make_engine(tiny_model_dir("qwen3"), num_kv_blocks=64)
    model, kv = engine.runner.model, engine.runner.kv_cache
    pad_slot = 63 * kv.block_size  # a block the test never allocates
    ids, positions, meta = decode_batch(engine, [5, 20, 33])
    assert is_decode_only(meta, len(ids))
    real_slots = meta.slot_mapping.tolist()
    with torch.inference_mode():
        before = kv.tensor.clone()
        plain = model(ids, positions, meta)
        kv.tensor.copy_(before)
        padded = padded_decode_inputs(ids, positions, meta, 8, pad_slot)
        assert padded["input_ids"].shape == (8,) and padded["context_lens"][3:].eq(1).all()
        meta.slot_mapping = padded["slot_mapping"]
        meta.decode_block_tables = padded["block_tables"]
        meta.decode_context_lens = padded["context_lens"]
        meta.num_decodes = 8
        out = model(padded["input_ids"], padded["positions"], meta)
    torch.testing.assert_close(out[:3], plain, atol=1e-5, rtol=1e-5)
    written = (kv.tensor != before).flatten(3).any(-1).any(0).any(0)  # per slot
    assert written.nonzero().flatten().tolist() == sorted(real_slots + [pad_slot])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("batch", [1, 3, 5, 17])
def test_graph_mode_greedy_equals_eager(tiny_model_dir, dtype, batch):
    model_dir = tiny_model_dir("qwen3", dtype)
    prompts = random_prompts([7 + 5 * i for i in range(batch)], 1000, seed=batch)
    outputs = {}
    for graph in (False, True):
        engine = make_engine(model_dir, dtype=dtype, graph_mode=graph, max_num_seqs=32)
        outputs[graph] = run_engine(engine, prompts, greedy(NEW_TOKENS))
        if graph:
            assert engine.runner.graph is not None
            assert engine.runner.graph.steps >= NEW_TOKENS - 1  # every decode step
        assert engine.block_manager.num_free_blocks == 256
    assert outputs[True] == outputs[False]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_graph_step_is_the_eager_step_to_the_bit(tiny_model_dir, arch, dtype):
    # The native step fuses what eager cannot across its modules (in bf16: q/k norm + RoPE
    # written straight into the pool, each residual add with the norm after it) and must
    # still round where eager rounds: the same hidden states and the same pool, over
    # contexts of random K/V spanning several blocks.
    engine = make_engine(tiny_model_dir(arch, dtype), dtype=dtype, graph_mode=True)
    graph, model, kv = engine.runner.graph, engine.runner.model, engine.runner.kv_cache
    assert graph is not None
    ids, positions, meta = decode_batch(engine, [2, 15, 16, 17, 40, 75])
    assert is_decode_only(meta, len(ids))
    with torch.inference_mode():
        kv.tensor.copy_(torch.randn(kv.tensor.shape, generator=torch.Generator().manual_seed(3)))
        before = kv.tensor.clone()
        eager = model(ids, positions, meta)
        eager_pool = kv.tensor.clone()
        kv.tensor.copy_(before)
        native = graph.run(ids, positions, meta)
    assert torch.equal(native, eager)
    assert torch.equal(kv.tensor, eager_pool)
    assert not torch.equal(eager_pool, before)  # (the step did write the pool)


@pytest.mark.parametrize("cause", ["moe-not-covered", "build-fails"])
def test_graph_mode_falls_back_to_eager(tiny_model_dir, caplog, monkeypatch, cause):
    model_dir = tiny_model_dir("qwen3-moe" if cause == "moe-not-covered" else "qwen3")
    prompts = random_prompts([9, 30], 1000, seed=11)
    if cause == "build-fails":  # as on a machine where the native kernels cannot build
        monkeypatch.setattr("xllm.ops.kernels", lambda: None)
    with caplog.at_level("WARNING", logger="xllm.engine.graph_runner"):
        engine = make_engine(model_dir, graph_mode=True)
    monkeypatch.undo()
    assert engine.runner.graph is None
    assert "running eager" in caplog.text
    fell_back = run_engine(engine, prompts, greedy(NEW_TOKENS))
    eager = run_engine(make_engine(model_dir), prompts, greedy(NEW_TOKENS))
    assert fell_back == eager


def test_graph_mode_with_speculation_equals_eager(loopy_model_dir):
    # Steps verifying drafts run eager, the plain decode steps through the graph: greedy
    # output is the same either way.
    model_dir = loopy_model_dir("qwen3")
    prompts = random_prompts([12, 25, 40], 1000, seed=13)
    outputs = {}
    for graph in (False, True):
        engine = make_engine(
            model_dir, speculative="ngram", speculative_adaptive=False, graph_mode=graph
        )
        outputs[graph] = run_engine(engine, prompts, greedy(24))
        assert engine.block_manager.num_free_blocks == 256
        if graph:  # both kinds of step happened
            assert 0 < engine.runner.graph.steps < engine.step_stats.num_steps - 1
    assert outputs[True] == outputs[False]
