"""Speculative decoding through the whole engine on the tiny models.

Greedy: outputs with speculation equal those without, token for token (and transformers'),
for batches mixing chunked prefills with verifications. The random tiny models rarely
repeat themselves, so besides the n-gram proposer (on a variant whose near-uniform attention
falls into loops, where prompt lookup has something to find) an oracle proposer that knows
the greedy continuation and spoils every 7th position makes every verification outcome
happen: all drafts kept plus a bonus, some kept, none. Sampled: the joint law of the first
three tokens under top-k 3 matches the exact target law from transformers (chi-square), also
when the drafts are the likeliest tokens — and a sampler that keeps every draft fails the
same test. KV: no block is leaked by aborts mid-speculation or by finishing, and the prefix
cache built while speculating serves later prompts correctly.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from conftest import ARCHS, assert_greedy_matches, greedy, make_engine, random_prompts, run_engine

from xllm.engine.block_manager import cdiv
from xllm.engine.proposer import Proposer
from xllm.engine.sequence import Sequence
from xllm.protocol import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test: sync and async steps

NEW_TOKENS = 40
SPOIL_EVERY = 7


class Oracle(Proposer):
    """Drafts the known continuation of each request, wrong at every SPOIL_EVERY-th position."""

    def __init__(self, prompts: list[list[int]], outputs: dict[str, list[int]], vocab: int):
        self.full = {str(i): p + outputs[str(i)] for i, p in enumerate(prompts)}
        self.vocab = vocab

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        n = seq.num_tokens
        drafts = self.full[seq.request_id][n : n + max_tokens]
        return [
            (t + 1) % self.vocab if (n + j) % SPOIL_EVERY == 0 else t for j, t in enumerate(drafts)
        ]


def speculative_engine(
    model_dir, proposer: Proposer | None = None, method: str = "ngram", **options
):
    engine = make_engine(model_dir, speculative=method, speculative_adaptive=False, **options)
    if proposer is not None:
        engine.scheduler.proposer = proposer
    return engine


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param


def test_greedy_with_drafts_of_every_outcome_equals_plain_and_transformers(
    tiny_model_dir, arch, hf_model
):
    model_dir = str(tiny_model_dir(arch))
    options = {"max_num_batched_tokens": 16}  # prefills in chunks, among verifications
    plain = make_engine(model_dir, **options)
    vocab = plain.model_config.vocab_size
    prompts = random_prompts([3, 17, 64, 31], vocab, seed=2)
    expected = run_engine(plain, prompts, greedy(NEW_TOKENS))
    engine = speculative_engine(model_dir, Oracle(prompts, expected, vocab), **options)
    assert run_engine(engine, prompts, greedy(NEW_TOKENS)) == expected
    stats = engine.speculation_stats()
    assert 0 < stats.num_accepted_draft_tokens < stats.num_draft_tokens
    assert engine.step_stats.num_steps < plain.step_stats.num_steps  # kept drafts saved steps
    hf = hf_model(model_dir)
    for i in (0, 2):
        assert_greedy_matches(hf, prompts[i], expected[str(i)], NEW_TOKENS)


@pytest.mark.parametrize("method", ["ngram", "suffix"])
def test_greedy_with_proposer_drafts_equals_plain(loopy_model_dir, arch, method):
    model_dir = loopy_model_dir(arch)
    plain = make_engine(model_dir, max_num_batched_tokens=32)
    vocab = plain.model_config.vocab_size
    repetitive = random_prompts([12], vocab, seed=7)[0] * 4
    prompts = [*random_prompts([20, 7, 50], vocab, seed=1), repetitive]
    expected = run_engine(plain, prompts, greedy(60))
    # The suffix proposer with its trie of every request's recent outputs too.
    extra = {"suffix_cache_nodes": 100_000} if method == "suffix" else {}
    engine = speculative_engine(model_dir, method=method, max_num_batched_tokens=32, **extra)
    assert run_engine(engine, prompts, greedy(60)) == expected
    assert engine.speculation_stats().num_accepted_draft_tokens > 10


def test_no_block_is_leaked_by_aborts_mid_speculation_or_by_finishing(tiny_model_dir):
    model_dir = str(tiny_model_dir("qwen3"))
    plain = make_engine(model_dir)
    vocab = plain.model_config.vocab_size
    prompts = random_prompts([5, 20, 33, 9, 14, 40], vocab, seed=4)
    expected = run_engine(plain, prompts, greedy(30))
    engine = speculative_engine(model_dir, Oracle(prompts, expected, vocab))
    bm = engine.block_manager
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, greedy(30))
    for step in itertools.count():
        if not engine.has_unfinished():
            break
        engine.step()
        bm.check_integrity()
        for seq in engine.scheduler.running:  # between steps: no block past the tokens
            assert len(seq.block_table) <= cdiv(seq.num_tokens, bm.block_size)
        if step == 4:
            for rid in ("1", "4"):
                assert engine.abort_request(rid)
    assert engine.speculation_stats().num_accepted_draft_tokens > 0
    assert bm.num_free_blocks == bm.num_blocks and not engine.sequences


def test_the_prefix_cache_filled_while_speculating_serves_later_prompts(tiny_model_dir):
    model_dir = str(tiny_model_dir("llama"))
    plain = make_engine(model_dir, enable_prefix_caching=False)
    vocab = plain.model_config.vocab_size
    (prompt,) = random_prompts([21], vocab, seed=5)
    first = run_engine(plain, [prompt], greedy(40))
    engine = speculative_engine(model_dir, Oracle([prompt], first, vocab))
    assert run_engine(engine, [prompt], greedy(40)) == first
    # A prompt extending the first request's tokens hits blocks written while speculating.
    longer = prompt + first["0"][:35]
    expected = run_engine(make_engine(model_dir, enable_prefix_caching=False), [longer], greedy(8))
    engine.scheduler.proposer = None  # plain decoding now: only the cached KV is on trial
    engine.speculation = None
    engine.add_request("again", longer, greedy(8))
    out = []
    while engine.has_unfinished():
        out += [t for d in engine.step() for t in d.token_ids]
    assert engine.block_manager.stats.hit_tokens >= 48  # three of its 16-token blocks
    assert out == expected["0"]


# -- sampled ---------------------------------------------------------------------------------

TOP_K = 3
SAMPLES = 400


def exact_law(hf, prompt: list[int], params: SamplingParams) -> dict[tuple[int, ...], float]:
    """P(t1, t2, t3) under top-k sampling at the params' temperature, from transformers."""

    def step_probs(tokens):
        with torch.no_grad():
            logits = hf(torch.tensor([tokens])).logits[0, -1].float() / params.temperature
        top = logits.topk(TOP_K)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist(), strict=True))

    law: dict[tuple[int, ...], float] = {}
    for t1, p1 in step_probs(prompt).items():
        for t2, p2 in step_probs(prompt + [t1]).items():
            for t3, p3 in step_probs(prompt + [t1, t2]).items():
                law[t1, t2, t3] = p1 * p2 * p3
    return law


class Likeliest(Proposer):
    """Drafts the target's likeliest next token (accepted with its probability, ~0.5)."""

    def __init__(self, law):
        second: dict[tuple[int, int], float] = {}
        for (t1, t2, _), p in law.items():
            second[t1, t2] = second.get((t1, t2), 0.0) + p
        self.best = {t1: max((p, t2) for (f, t2), p in second.items() if f == t1)[1]
                     for t1, _ in second}  # fmt: skip

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        return [self.best[seq.output_token_ids[0]]][:max_tokens]


def chi_square_critical(df: int, z: float = 3.719) -> float:
    """Upper 1e-4 point of chi-square(df), Wilson-Hilferty approximation."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def chi_square(outputs: dict[str, list[int]], law) -> tuple[float, int]:
    """Statistic and degrees of freedom, cells expected under 5 samples pooled."""
    counts = dict.fromkeys(law, 0)
    for tokens in outputs.values():
        counts[tuple(tokens)] += 1  # a token outside the top 3 raises KeyError: a failure
    n = len(outputs)
    big = [c for c in law if law[c] * n >= 5]
    pooled_p = sum(law[c] for c in law if c not in big)
    pooled_n = sum(counts[c] for c in law if c not in big)
    stat = sum((counts[c] - n * law[c]) ** 2 / (n * law[c]) for c in big)
    stat += (pooled_n - n * pooled_p) ** 2 / (n * pooled_p) if pooled_p else 0.0
    return stat, len(big) - (0 if pooled_p else 1)


def sampled_run(engine, prompt, temperature: float) -> dict[str, list[int]]:
    params = [
        SamplingParams(max_tokens=3, temperature=temperature, top_k=TOP_K, seed=s, ignore_eos=True)
        for s in range(SAMPLES)
    ]
    return run_engine(engine, [prompt] * SAMPLES, params)


def test_sampled_outputs_follow_the_target_law(tiny_model_dir, hf_model):
    from test_rejection_sampler import KeepsEveryDraft

    model_dir = str(tiny_model_dir("qwen3"))
    options = {"max_num_seqs": 128, "num_kv_blocks": 512}
    engine = speculative_engine(model_dir, **options)
    (prompt,) = random_prompts([10], engine.model_config.vocab_size, seed=9)
    temperature = 1.5  # flatter: no cell too rare to count
    law = exact_law(hf_model(model_dir), prompt, SamplingParams(temperature=temperature))
    engine.scheduler.proposer = Likeliest(law)
    outputs = sampled_run(engine, prompt, temperature)
    assert engine.speculation_stats().num_accepted_draft_tokens > SAMPLES // 4
    stat, df = chi_square(outputs, law)
    assert stat < chi_square_critical(df), (stat, df)

    broken = speculative_engine(model_dir, Likeliest(law), **options)
    broken.runner.rejection_sampler = KeepsEveryDraft()
    stat, df = chi_square(sampled_run(broken, prompt, temperature), law)
    assert stat > chi_square_critical(df), "the test cannot tell a broken sampler"
