"""Beam search in the engine against transformers' `generate(num_beams=W)` on the same
random-weight checkpoints, plus item-trie constraints and the KV pool afterwards.

Beams are sequences of the continuous batch (engine/beam_search.py), so the comparison
also runs them next to an unrelated greedy request. Equality is token for token on every
returned beam, and the cumulative logprobs (length-penalised) match transformers'
`sequences_scores`.
"""

from __future__ import annotations

import collections

import pytest
import torch
from conftest import greedy, make_engine, random_prompts

from xllm.protocol.types import SamplingParams

PROMPT_LEN = 11  # not a multiple of the block size: the first forks copy a partial block
MAX_TOKENS = 12  # 11 + 12 crosses a block boundary: later forks share only full blocks


def beam_params(width: int, n: int, **kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(
        use_beam_search=True, beam_width=width, n=n, max_tokens=MAX_TOKENS, **kw
    )


def run_beams(engine, prompt, params, request_id="beam", others=()):
    """Step to completion; returns the beam request's outputs by rank (and checks that no
    delta of it came before the end)."""
    engine.add_request(request_id, prompt, params)
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
    pytest.param(2, 2, 1.0, False, False, id="w2"),
    pytest.param(4, 3, 2.0, True, True, id="w4-lp2-early"),
    pytest.param(8, 4, -0.5, "never", True, id="w8-lp-0.5-never"),
    pytest.param(8, 8, 1.0, False, True, id="w8-stop"),
]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
@pytest.mark.parametrize(("width", "n", "length_penalty", "early_stopping", "stop"), CASES)
def test_beam_search_matches_transformers(
    tiny_model_dir, hf_model, arch, width, n, length_penalty, early_stopping, stop
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
    )
    assert [o.token_ids for o in ours] == theirs
    ours_scores = [o.cumulative_logprob / len(o.token_ids) ** length_penalty for o in ours]
    assert ours_scores == pytest.approx(scores, abs=1e-4)
    if stop and length_penalty <= 1.0:  # (a penalty > 1 favours the beams that ran longest)
        assert any(o.finish_reason == "stop" for o in ours), "no beam stopped: a weak test"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
