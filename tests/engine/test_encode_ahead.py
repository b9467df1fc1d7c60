"""The step's third part (engine/encode_ahead.py): images of waiting requests are encoded
ahead of their prefill, within the per-step encode budget, and greedy outputs stay the
engine's own without it. Text-only models never plan encodes."""

from __future__ import annotations

import pytest
from conftest import greedy, make_engine
from test_multimodal_engine import image_inputs
from test_qwen2_vl_vs_hf import chat_ids

NEW_TOKENS = 6
SIZES = [[(60, 90), (120, 50)], [(60, 90)], [(120, 50), (60, 90)], [(90, 90)]]
"""Four requests of 1-2 images (6, 8 or 9 tokens each), different pixels per request."""


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2-vl"))


def run(model_dir, **options):
    """All four requests at once, two at a time in the batch, prompts in 16-token chunks.
    Returns ({request: tokens}, the engine, per step: [(ahead images, ahead tokens, reached
    images, reached tokens)], requests whose first chunk found every image encoded)."""
    engine = make_engine(
        model_dir, max_num_seqs=2, max_num_batched_tokens=16, enable_prefix_caching=False,
        **options,
    )  # fmt: skip
    steps, ready_at_start = [], set()
    schedule = engine.scheduler.schedule

    def watched(*args, **kw):
        out = schedule(*args, **kw)
        reached = [0, 0]
        for item in out.scheduled:
            mm, lo = item.seq.mm, item.seq.num_computed_tokens
            if mm is None:
                continue
            if lo == 0 and all(e is not None for e in mm.embeddings):
                ready_at_start.add(item.seq.request_id)
            for (start, count), e in zip(mm.spans, mm.embeddings, strict=True):
                if e is None and start < lo + item.num_new_tokens and lo < start + count:
                    reached[0], reached[1] = reached[0] + 1, reached[1] + count
        ahead = [mm.spans[k][1] for mm, k in out.encodes]
        steps.append((len(ahead), sum(ahead), *reached))
        return out

    engine.scheduler.schedule = watched
    for i, sizes in enumerate(SIZES):
        prompt = chat_ids(model_dir, len(sizes))
        images = image_inputs(model_dir, sizes, seed=i)
        engine.add_request(f"r{i}", prompt, greedy(NEW_TOKENS), images=images)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
    return tokens, engine, steps, ready_at_start


def test_waiting_images_are_encoded_ahead_within_the_budget_and_outputs_do_not_change(
    model_dir,
):
    alone, engine, steps, ready = run(model_dir, max_encode_batch=0)
    assert engine.scheduler.encode_ahead is None and not any(s[0] for s in steps)
    assert not ready  # each prompt's first chunk waited for its tower call
    tower = engine.runner.tower_stats  # the heartbeat's encoder batches and latency
    assert tower.images_encoded == 6 and tower.batches == sum(1 for s in steps if s[2])
    assert tower.encode_seconds > 0

    for batch, tokens_budget in ((4, 0), (2, 0), (3, 10)):
        got, engine, steps, ready = run(
            model_dir, max_encode_batch=batch, max_encode_tokens=tokens_budget
        )
        assert got == alone  # embeddings are the same whenever they are computed
        assert engine.scheduler.encode_ahead.num_encoded_ahead > 0
        assert ready  # a waiting request's images were ready at its first chunk
        assert engine.runner.tower_stats.images_encoded == 6  # each image once
        for ahead, ahead_tokens, reached, reached_tokens in steps:
            assert ahead == 0 or ahead + reached <= batch
            if tokens_budget and ahead:
                assert ahead_tokens + reached_tokens <= tokens_budget
    assert not engine.scheduler.encode_ahead.unencoded  # every prompt done: forgotten


def test_text_models_plan_no_encodes(tiny_model_dir):
    engine = make_engine(tiny_model_dir("qwen3"))
    assert engine.scheduler.encode_ahead is None
