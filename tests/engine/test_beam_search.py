"""Beam search in the engine against transformers' `generate(num_beams=W)` on the same
random-weight checkpoints, plus item-trie constraints and the KV pool afterwards.

Beams are sequences of the continuous batch (engine/beam_search.py), so the comparison
also runs them next to an unrelated greedy request. Equality is token for token on every
returned beam, and the cumulative logprobs (length-penalised) match transformers'
`sequences_scores`.
"""

from __future__ import annotations

import collections
import dataclasses

import pytest
import torch
from conftest import greedy, make_engine, random_prompts

from xllm.protocol.types import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test: sync and async steps

PROMPT_LEN = 11  # not a multiple of the block size: the first forks copy a partial block
MAX_TOKENS = 12  # 11 + 12 crosses a block boundary: later forks share only full blocks


def beam_params(width: int, n: int, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(use_beam_search=True, beam_width=width, n=n, max_tokens=MAX_TOKENS, **kw)


def run_beams(engine, prompt, params, request_id="beam", others=(), priority=0):
    """Step to completion; returns the beam request's outputs by rank (and checks that no
    delta of it came before the end)."""
    engine.add_request(request_id, prompt, params, priority=priority)
    for i, other in enumerate(others):
        engine.add_request(f"other{i}", other, greedy(MAX_TOKENS))
    beams = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id:
                assert out.finish_reason is not None and out.cumulative_logprob is not None
                beams[out.index] = out
    return [beams[i] for i in range(params.n)]


def hf_beams(model, prompt, width, n, stop=None, **kw):
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=MAX_TOKENS,
        num_beams=width,
        num_return_sequences=n,
        do_sample=False,
        eos_token_id=stop,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_scores=True,
        **kw,
    )
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    beams = []
    for row in out.sequences[:, len(prompt) :].tolist():
        if stop is not None and stop in row:
            row = row[: row.index(stop) + 1]
        beams.append(row)
    return beams, out.sequences_scores.tolist()


def frequent_token(engine, prompt) -> int:
    """A token the unconstrained beams often take after their first: as a stop token it
    ends beams mid-search, which is what early stopping and length penalty act on."""
    outs = run_beams(engine, prompt, beam_params(8, 8), request_id="probe")
    counts = collections.Counter(t for out in outs for t in out.token_ids[1:])
    return counts.most_common(1)[0][0]


CASES = [
    pytest.param(2, 2, 1.0, False, False, 0, id="w2"),
    pytest.param(4, 3, 2.0, True, True, 0, id="w4-lp2-early"),
    pytest.param(4, 4, 1.0, True, True, 5, id="w4-early-min5"),
    pytest.param(8, 4, -0.5, "never", True, 0, id="w8-lp-0.5-never"),
    pytest.param(8, 8, 1.0, False, True, 0, id="w8-stop"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(
    ("width", "n", "length_penalty", "early_stopping", "stop", "min_tokens"), CASES
)
def test_beam_search_matches_transformers(
    tiny_model_dir, hf_model, arch, width, n, length_penalty, early_stopping, stop, min_tokens
):
    model_dir = str(tiny_model_dir(arch))
    engine = make_engine(model_dir)
    vocab = engine.model_config.vocab_size
    prompt, other = random_prompts([PROMPT_LEN, 20], vocab, seed=7)
    stop_id = frequent_token(engine, prompt) if stop else None
    params = beam_params(
        width,
        n,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        stop_token_ids=[stop_id] if stop else [],
        min_tokens=min_tokens,
    )
    ours = run_beams(engine, prompt, params, others=[other])
    theirs, scores = hf_beams(
        hf_model(model_dir),
        prompt,
        width,
        n,
        stop=stop_id,
        length_penalty=length_penalty,
        early_stopping=early_stopping,
        min_new_tokens=min_tokens,
    )
    assert [o.token_ids for o in ours] == theirs
    assert all(len(o.token_ids) >= min_tokens for o in ours)
    ours_scores = [o.cumulative_logprob / len(o.token_ids) ** length_penalty for o in ours]
    assert ours_scores == pytest.approx(scores, abs=1e-4)
    if stop and length_penalty <= 1.0:  # (a penalty > 1 favours the beams that ran longest)
        assert any(o.finish_reason == "stop" for o in ours), "no beam stopped: a weak test"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def random_items(vocab: int, count: int, seed: int = 0) -> list[list[int]]:
    """`count` distinct random item ids of 2 to 4 tokens (some prefixes of others)."""
    g = torch.Generator().manual_seed(seed)
    items: dict[tuple[int, ...], None] = {}
    while len(items) < count:
        length = int(torch.randint(2, 5, (1,), generator=g))
        items[tuple(torch.randint(3, vocab, (length,), generator=g).tolist())] = None
    return [list(item) for item in items]


def strip_stop(tokens: list[int], stop_ids) -> tuple[int, ...]:
    return tuple(tokens[:-1] if tokens and tokens[-1] in stop_ids else tokens)


def test_every_beam_is_a_valid_item(tiny_model_dir):
    engine = make_engine(tiny_model_dir("qwen3"))
    vocab = engine.model_config.vocab_size
    items = random_items(vocab, 1000)
    # Short items that are prefixes of longer ones: those may end only with a stop token.
    items += [item[:1] for item in items[:20]]
    (prompt,) = random_prompts([PROMPT_LEN], vocab, seed=3)
    params = SamplingParams(
        use_beam_search=True, beam_width=16, n=16, max_tokens=6, allowed_items=items
    )
    outs = run_beams(engine, prompt, params)
    valid = {tuple(item) for item in items}
    stops = set(engine.model_config.eos_token_ids)
    assert all(strip_stop(o.token_ids, stops) in valid for o in outs), [o.token_ids for o in outs]
    assert len({tuple(o.token_ids) for o in outs}) == 16
    scores = [o.cumulative_logprob / len(o.token_ids) for o in outs]
    assert scores == sorted(scores, reverse=True)
    # Unconstrained, the same search returns no item: the mask is what made them valid.
    free = run_beams(
        engine,
        prompt,
        SamplingParams(use_beam_search=True, beam_width=16, n=16, max_tokens=6),
        "free",
    )
    assert not any(strip_stop(o.token_ids, stops) in valid for o in free)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_an_item_trie_registered_by_name(tiny_model_dir, tmp_path):
    path = tmp_path / "items.txt"
    items = random_items(1000, 50, seed=1)
    path.write_text("\n".join(" ".join(map(str, item)) for item in items) + "\n")
    engine = make_engine(tiny_model_dir("llama"), item_trie=f"items={path}")
    (prompt,) = random_prompts([PROMPT_LEN], engine.model_config.vocab_size, seed=4)
    params = SamplingParams(
        use_beam_search=True, beam_width=4, n=4, max_tokens=4, ignore_eos=True, item_trie="items"
    )
    outs = run_beams(engine, prompt, params)
    assert all(tuple(o.token_ids) in {tuple(i) for i in items} for o in outs)
    unknown = dataclasses.replace(params, item_trie="nope")
    with pytest.raises(ValueError, match="item_trie 'nope' is not registered"):
        engine.add_request("x", prompt, unknown)
    # A prefill instance only computes the prompt: it needs no trie.
    engine.add_request("p", prompt, unknown, prefill_only=True)
    assert engine.abort_request("p") and not engine.sequences


def wide_engine(tiny_model_dir):
    return make_engine(tiny_model_dir("llama"), max_num_seqs=128, num_kv_blocks=512)


def test_width_128_runs_and_frees_every_block(tiny_model_dir):
    engine = wide_engine(tiny_model_dir)
    bm = engine.block_manager
    (prompt,) = random_prompts([PROMPT_LEN + 16], engine.model_config.vocab_size, seed=5)
    params = beam_params(128, 4)
    engine.add_request("wide", prompt, params)
    most_beams = most_blocks = 0
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.index] = out
        bm.check_integrity()
        live = engine.sequences.get("wide", [])
        most_beams = max(most_beams, len(live))
        most_blocks = max(most_blocks, bm.num_used_blocks)
        if live:  # copy-on-write: the prompt's full block is one block shared by all beams
            assert len({seq.block_table[0] for seq in live}) == 1
    assert most_beams == 128 and len(outs) == 4
    assert all(len(o.token_ids) == MAX_TOKENS for o in outs.values())
    assert most_blocks < 128 * 3, "beams share their common blocks"
    assert bm.num_free_blocks == bm.num_blocks and not engine.sequences


def test_aborting_a_wide_search_frees_every_block(tiny_model_dir):
    engine = wide_engine(tiny_model_dir)
    bm = engine.block_manager
    (prompt,) = random_prompts([PROMPT_LEN], engine.model_config.vocab_size, seed=6)
    engine.add_request("wide", prompt, beam_params(128, 2))
    for _ in range(5):
        assert not engine.step(), "a beam search streams nothing before its end"
    assert len(engine.sequences["wide"]) == 128 and bm.num_used_blocks > 0
    assert engine.abort_request("wide")
    bm.check_integrity()
    assert bm.num_free_blocks == bm.num_blocks and not engine.has_unfinished()


def test_beams_decoded_after_a_pd_handoff_equal_the_colocated_ones(tiny_model_dir):
    """The prefill engine computes the prompt (and samples a first token the beams do not
    use); the decode engine gets the KV, computes the prompt's last token again for its
    logits, and runs the whole search."""
    model_dir = tiny_model_dir("qwen3")
    prefill, decode, colocated = (make_engine(model_dir) for _ in range(3))
    (prompt,) = random_prompts([PROMPT_LEN + 16], prefill.model_config.vocab_size, seed=8)
    params = beam_params(4, 2, length_penalty=0.7)
    prefill.add_request("r", prompt, params, prefill_only=True)
    (first,) = prefill.step()
    assert first.prefilled
    reservation = decode.reserve_remote_prefill("r", prompt, params)
    bs = prefill.config.block_size
    source, target = prefill.runner.kv_cache.tensor, decode.runner.kv_cache.tensor
    for src, dst in zip(prefill.prefilled_block_ids("r"), reservation.fill_block_ids, strict=True):
        target[:, :, dst * bs : (dst + 1) * bs] = source[:, :, src * bs : (src + 1) * bs]
    prefill.release_prefilled("r")
    assert decode.commit_remote_prefill("r", first.token_ids[0]) is None
    handed = {}
    while decode.has_unfinished():
        handed.update({out.index: out for out in decode.step()})
    expected = run_beams(colocated, prompt, params)
    assert [handed[i].token_ids for i in range(2)] == [o.token_ids for o in expected]
    assert [handed[i].cumulative_logprob for i in range(2)] == pytest.approx(
        [o.cumulative_logprob for o in expected], abs=1e-5
    )
    for engine in (prefill, decode):
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("priority", [0, 1], ids=["online", "offline"])
def test_beams_preempted_and_recomputed_still_match_transformers(
    tiny_model_dir, hf_model, priority
):
    """A pool too small for the beams and three other requests at once: beams are preempted
    (their KV dropped, recomputed later — offline ones too, never swapped: see
    Scheduler._preempt) and their group waits for them."""
    model_dir = str(tiny_model_dir("llama"))
    engine = make_engine(model_dir, num_kv_blocks=12, enable_prefix_caching=False)
    vocab = engine.model_config.vocab_size
    prompt, *others = random_prompts([PROMPT_LEN, 30, 30, 30], vocab, seed=9)
    ours = run_beams(engine, prompt, beam_params(4, 4), others=others, priority=priority)
    assert engine.scheduler.num_preemptions > 0
    theirs, _ = hf_beams(hf_model(model_dir), prompt, 4, 4)
    assert [o.token_ids for o in ours] == theirs
    assert engine.block_manager.num_free_blocks == 12


def test_beams_next_to_speculation_and_a_pool_too_small(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3")
    (prompt,) = random_prompts([PROMPT_LEN], 500, seed=10)
    plain = run_beams(make_engine(model_dir), prompt, beam_params(4, 2))
    speculative = make_engine(model_dir, speculative="ngram", speculative_adaptive=False)
    assert [o.token_ids for o in run_beams(speculative, prompt, beam_params(4, 2))] == [
        o.token_ids for o in plain
    ]
    small = make_engine(model_dir, num_kv_blocks=4)
    with pytest.raises(ValueError, match="may need 8 KV blocks; this instance has 4"):
        small.add_request("x", prompt, beam_params(4, 2))
