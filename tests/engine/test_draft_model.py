"""Speculative decoding with a draft model (`--speculative draft --draft-model PATH`).

Greedy outputs equal the engine without speculation token for token, on the 3 tiny
architectures, with two drafts: the target itself (nearly every draft kept: the all-kept
path and the draft's KV of kept drafts are exercised) and a different architecture with
other layer/head shapes and weights but the same vocabulary (most drafts rejected: its KV
past the first rejection must be recomputed). Prompts are prefilled in chunks among
verifications, the draft's KV lives in a mirror pool indexed by the target's block tables
and no block leaks; a PD decode instance, which receives only the target's KV, catches the
draft up on the prompt.
"""

from __future__ import annotations

import pytest
from conftest import ARCHS, greedy, handed_over, make_engine, random_prompts, run_engine

from xllm.engine.block_manager import cdiv

OTHER = {"llama": "qwen3", "qwen2": "llama", "qwen3": "qwen2"}
NEW_TOKENS = 30


def draft_engine(model_dir, draft_dir, **options):
    return make_engine(
        model_dir,
        speculative="draft",
        draft_model=str(draft_dir),
        speculative_adaptive=False,
        **options,
    )


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("draft", ["self", "other"])
def test_greedy_with_a_draft_model_equals_plain(tiny_model_dir, arch, draft):
    model_dir = tiny_model_dir(arch)
    draft_dir = model_dir if draft == "self" else tiny_model_dir(OTHER[arch])
    options = {"max_num_batched_tokens": 24}  # prompts in chunks, among verifications
    plain = make_engine(model_dir, **options)
    prompts = random_prompts([5, 40, 17], plain.model_config.vocab_size, seed=3)
    expected = run_engine(plain, prompts, greedy(NEW_TOKENS))
    engine = draft_engine(model_dir, draft_dir, **options)
    assert engine.runner.draft.kv_cache.tensor.shape[2] == engine.runner.kv_cache.tensor.shape[2]
    assert run_engine(engine, prompts, greedy(NEW_TOKENS)) == expected
    stats = engine.speculation_stats()
    assert stats.num_draft_tokens > 0
    if draft == "self":  # the target drafting for itself: (nearly) every draft is kept
        assert stats.num_accepted_draft_tokens > 0.9 * stats.num_draft_tokens
        assert engine.step_stats.num_steps < plain.step_stats.num_steps / 2
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and not engine.sequences


def test_no_block_past_the_tokens_between_steps_and_none_leaked(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    engine = draft_engine(model_dir, tiny_model_dir("llama"))
    bm = engine.block_manager
    for i, prompt in enumerate(random_prompts([9, 33, 20], 4000, seed=6)):
        engine.add_request(str(i), prompt, greedy(25))
    step = 0
    while engine.has_unfinished():
        engine.step()
        step += 1
        bm.check_integrity()
        for seq in engine.scheduler.running:
            assert len(seq.block_table) <= cdiv(seq.num_tokens, bm.block_size)
        if step == 5:
            assert engine.abort_request("1")
    assert engine.speculation_stats().num_draft_tokens > 0
    assert bm.num_free_blocks == bm.num_blocks and not engine.sequences


def test_a_pd_decode_instance_catches_the_draft_up_on_the_prompt(tiny_model_dir):
    model_dir = tiny_model_dir("llama")
    (prompt,) = random_prompts([45], 4000, seed=8)
    expected = run_engine(make_engine(model_dir), [prompt], greedy(NEW_TOKENS))["0"]
    prefill = make_engine(model_dir)
    decode = draft_engine(model_dir, model_dir)
    _, tokens = handed_over(prefill, decode, prompt, greedy(NEW_TOKENS))
    assert tokens == expected
    stats = decode.speculation_stats()
    # Drafting for itself from a caught-up KV: kept as often as not speculating at all.
    assert stats.num_accepted_draft_tokens > 0.9 * stats.num_draft_tokens > 0


def test_a_draft_of_another_vocabulary_is_refused(tiny_model_dir, tmp_path):
    import json
    import shutil

    other = tmp_path / "draft"
    shutil.copytree(tiny_model_dir("qwen2"), other)
    config = json.loads((other / "config.json").read_text())
    config["vocab_size"] += 64
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="vocabulary"):
        draft_engine(tiny_model_dir("llama"), other)


def test_draft_flags_go_together():
    from xllm.config import EngineConfig

    with pytest.raises(ValueError, match="--draft-model"):
        EngineConfig(model="m", speculative="draft").validate()
    with pytest.raises(ValueError, match="--draft-model"):
        EngineConfig(model="m", draft_model="d").validate()


@pytest.mark.slow  # 400 sampled requests; the rejection sampler itself is tested fast elsewhere
def test_sampled_outputs_with_draft_model_drafts_follow_the_target_law(tiny_model_dir, hf_model):
    """The target drafting for itself proposes its greedy tokens (the likeliest, kept about
    half the time at this temperature): the joint law of the first three sampled tokens must
    still be the target's."""
    from test_speculative_engine import (
        SAMPLES,
        chi_square,
        chi_square_critical,
        exact_law,
        sampled_run,
    )

    from xllm.protocol import SamplingParams

    model_dir = tiny_model_dir("qwen3")
    engine = draft_engine(model_dir, model_dir, max_num_seqs=128, num_kv_blocks=512)
    (prompt,) = random_prompts([10], engine.model_config.vocab_size, seed=9)
    temperature = 1.5
    law = exact_law(hf_model(str(model_dir)), prompt, SamplingParams(temperature=temperature))
    outputs = sampled_run(engine, prompt, temperature)
    assert engine.speculation_stats().num_accepted_draft_tokens > SAMPLES // 8
    stat, df = chi_square(outputs, law)
    assert stat < chi_square_critical(df), (stat, df)


def test_preempted_sequences_recompute_their_draft_kv(tiny_model_dir):
    """A pool too small for every request: sequences are preempted and recomputed, their
    blocks (and so the draft's KV in them) handed to others; drafts must come from the
    recomputed KV, not the stale one (the target drafting for itself keeps nearly all)."""
    model_dir = tiny_model_dir("qwen2")
    prompts = random_prompts([40, 36, 44], 4000, seed=12)
    expected = run_engine(make_engine(model_dir), prompts, greedy(NEW_TOKENS))
    engine = draft_engine(model_dir, model_dir, num_kv_blocks=11)  # 176 slots for ~210 tokens
    assert run_engine(engine, prompts, greedy(NEW_TOKENS)) == expected
    assert engine.scheduler.num_preemptions > 0
    stats = engine.speculation_stats()
    assert stats.num_accepted_draft_tokens > 0.9 * stats.num_draft_tokens > 0


def test_steps_with_speculation_off_run_no_draft_and_it_catches_up_when_on(tiny_model_dir):
    """The adaptive switch off (scripted here: steps 4-25 plain) costs the draft nothing —
    not even the KV of the prompt chunks prefilled meanwhile; switched back on, the draft
    catches up on everything it skipped in one timed forward and drafts from a correct KV
    (drafting for itself: nearly every draft kept), and the output equals plain decoding."""
    model_dir = tiny_model_dir("qwen3")
    options = {"max_num_batched_tokens": 24}
    prompts = random_prompts([5, 40, 17], 4000, seed=4)
    expected = run_engine(make_engine(model_dir, **options), prompts, greedy(40))
    engine = draft_engine(model_dir, model_dir, **options)
    calls: list[int] = []
    engine.runner.draft.model.register_forward_hook(lambda *_: calls.append(step))
    catch_ups: list[float] = []
    catch_up = engine.runner.draft.catch_up
    engine.runner.draft.catch_up = lambda seqs: catch_ups.append(catch_up(seqs)) or catch_ups[-1]
    k = engine.config.num_speculative_tokens
    engine.speculation.num_draft_tokens = lambda batch: 0 if 4 <= step <= 25 else k
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(40))
    outputs: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    step = 0
    while engine.has_unfinished():
        step += 1
        for delta in engine.step():
            outputs[delta.request_id] += delta.token_ids
    assert outputs == expected
    assert calls and not [s for s in calls if 4 <= s <= 25]
    assert sum(1 for seconds in catch_ups if seconds > 0) == 1  # at step 26, once
    stats = engine.speculation_stats()
    assert stats.num_accepted_draft_tokens > 0.9 * stats.num_draft_tokens > 0
