"""Our engine against Hugging Face transformers on the same random-weight checkpoints.

Comparison rule: prefill logits agree within 1e-4 (float32); greedy tokens are equal
token for token, for every path the scheduler can take (batched, chunked, prefix-cache
hit, preempted and recomputed) — except after an exact tie of transformers' top two
logits, where either token is right (`assert_greedy_matches`).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    ARCHS,
    MOE_ARCHS,
    assert_greedy_matches,
    greedy,
    make_engine,
    random_prompts,
    run_engine,
)

from xllm.engine.scheduler import ScheduledSeq
from xllm.engine.sequence import Sequence
from xllm.protocol.types import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test: sync and async steps

NEW_TOKENS = 40


@pytest.fixture(params=ARCHS + MOE_ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def model_dir(tiny_model_dir, arch):
    return str(tiny_model_dir(arch))


@pytest.fixture(params=["eager", "graph"])
def engine_of(request, arch):
    """make_engine, eager or with --graph-mode (decode-only steps through the graph:
    engine/graph_runner.py); MoE models have no graph (they fall back to eager)."""
    graph = request.param == "graph"
    if graph and arch in MOE_ARCHS:
        pytest.skip("MoE models run eager in graph mode (test_graph_mode.py: fallback)")

    engines = []

    def make(model_dir, **options):
        engine = make_engine(model_dir, graph_mode=graph, **options)
        assert (engine.runner.graph is not None) == graph
        engines.append(engine)
        return engine

    yield make
    for engine in engines:  # the graph did run the decode steps
        assert not graph or engine.runner.graph.steps > 0


def prompt_logits(engine, prompt: list[int]) -> torch.Tensor:
    """Our logits at every prompt position, via the runner's own input preparation."""
    seq = Sequence("probe", prompt, SamplingParams())
    assert engine.block_manager.allocate(seq, len(prompt))
    runner = engine.runner
    try:
        with torch.inference_mode():
            ids, positions, meta = runner._prepare([ScheduledSeq(seq, len(prompt), True)])
            return runner.model.compute_logits(runner.model(ids, positions, meta))
    finally:
        engine.block_manager.free(seq)


def test_prefill_logits_match_transformers(model_dir, hf_model):
    engine = make_engine(model_dir)
    hf = hf_model(model_dir)
    (prompt,) = random_prompts([50], engine.model_config.vocab_size)
    ours = prompt_logits(engine, prompt)
    with torch.no_grad():
        theirs = hf(torch.tensor([prompt])).logits[0].float()
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_greedy_single_prompt_matches_transformers(model_dir, hf_model, engine_of):
    engine = engine_of(model_dir)
    (prompt,) = random_prompts([23], engine.model_config.vocab_size, seed=1)
    out = run_engine(engine, [prompt], greedy(NEW_TOKENS))
    assert_greedy_matches(hf_model(model_dir), prompt, out["0"], NEW_TOKENS)
    assert len(set(out["0"])) > 5, "degenerate model output makes this test meaningless"


def test_greedy_mixed_batch_matches_transformers(model_dir, hf_model, engine_of):
    engine = engine_of(model_dir)
    prompts = random_prompts([3, 17, 64, 31, 100], engine.model_config.vocab_size, seed=2)
    out = run_engine(engine, prompts, greedy(NEW_TOKENS))
    hf = hf_model(model_dir)
    for i, prompt in enumerate(prompts):
        assert_greedy_matches(hf, prompt, out[str(i)], NEW_TOKENS)


def test_chunked_prefill_matches_transformers(model_dir, hf_model, engine_of):
    # A 16-token budget cuts the 90-token prompt into 6+ chunks, interleaved with decodes.
    engine = engine_of(model_dir, max_num_batched_tokens=16)
    prompts = random_prompts([90, 5, 40], engine.model_config.vocab_size, seed=3)
    out = run_engine(engine, prompts, greedy(NEW_TOKENS))
    hf = hf_model(model_dir)
    for i, prompt in enumerate(prompts):
        assert_greedy_matches(hf, prompt, out[str(i)], NEW_TOKENS)
    assert engine.step_stats.num_steps > NEW_TOKENS + 5


def test_prefix_cache_hit_matches_transformers(model_dir, hf_model, engine_of):
    engine = engine_of(model_dir)
    vocab = engine.model_config.vocab_size
    system, tail_a, tail_b = random_prompts([70, 9, 13], vocab, seed=4)
    first = run_engine(engine, [system + tail_a], greedy(NEW_TOKENS))
    assert engine.block_manager.stats.hit_tokens == 0
    second = run_engine(engine, [system + tail_b], greedy(NEW_TOKENS))
    hits = engine.block_manager.stats.hit_tokens
    assert hits == 64, "the 4 full blocks of the shared 70-token prefix are reused"
    hf = hf_model(model_dir)
    assert_greedy_matches(hf, system + tail_a, first["0"], NEW_TOKENS)
    assert_greedy_matches(hf, system + tail_b, second["0"], NEW_TOKENS)


def test_preemption_and_recompute_match_transformers(model_dir, hf_model, engine_of):
    # 10 blocks of 16 tokens cannot hold four 30 + 40 token sequences at once.
    engine = engine_of(model_dir, num_kv_blocks=10, enable_prefix_caching=False)
    prompts = random_prompts([30, 30, 30, 30], engine.model_config.vocab_size, seed=5)
    out = run_engine(engine, prompts, greedy(NEW_TOKENS))
    assert engine.scheduler.num_preemptions > 0
    hf = hf_model(model_dir)
    for i, prompt in enumerate(prompts):
        assert_greedy_matches(hf, prompt, out[str(i)], NEW_TOKENS)
    assert engine.block_manager.num_free_blocks == 10
