"""Sampling features end to end on a tiny model: seeds, n > 1, logprobs, penalties, stops."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, handed_over, hf_greedy, make_engine, random_prompts, run_engine

from xllm.protocol.types import SamplingParams

pytestmark = pytest.mark.usefixtures("overlap")  # every test: sync and async steps


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


@pytest.fixture
def engine(model_dir):
    return make_engine(model_dir)


def prompts(engine, lengths, seed=0):
    return random_prompts(lengths, engine.model_config.vocab_size, seed)


def test_same_seed_same_tokens_whatever_the_batch(engine, model_dir):
    p = prompts(engine, [12, 30, 7])
    seeded = SamplingParams(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    alone = run_engine(engine, [p[0]], seeded)["0"]
    other = SamplingParams(max_tokens=24, temperature=0.8, ignore_eos=True)
    batched = run_engine(make_engine(model_dir), p, [seeded, other, other])["0"]
    assert alone == batched
    different = run_engine(
        make_engine(model_dir), [p[0]], SamplingParams(max_tokens=24, seed=99, ignore_eos=True)
    )
    assert different["0"] != alone


def test_n_completions_share_prompt_blocks(engine):
    (p,) = prompts(engine, [40])  # 2 full blocks + a partial one
    params = SamplingParams(n=3, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True)
    engine.add_request("r", p, params)
    engine.step()  # the prefill step forks the siblings
    seqs = engine.sequences["r"]
    assert len(seqs) == 3
    shared = set(seqs[0].block_table[:2])
    assert all(set(s.block_table[:2]) == shared for s in seqs)
    assert len({s.block_table[2] for s in seqs}) == 3, "partial block copied per sibling"
    out = {}
    while engine.has_unfinished():
        for d in engine.step():
            out.setdefault(d.index, []).extend(d.token_ids)
    assert sorted(out) == [0, 1, 2] and all(len(v) == 19 for v in out.values())
    assert len({tuple(v) for v in out.values()}) == 3, "independent samples"
    assert engine.block_manager.num_used_blocks == 0


def test_n_greedy_completions_equal_single_greedy(engine, model_dir):
    (p,) = prompts(engine, [21], seed=3)
    single = run_engine(make_engine(model_dir), [p], greedy(16))["0"]
    many = run_engine(engine, [p], greedy(16, n=3))
    assert many["0"] == many["0/1"] == many["0/2"] == single


def test_logprobs_are_the_models_log_softmax(engine, model_dir, hf_model):
    (p,) = prompts(engine, [15], seed=4)
    engine.add_request("r", p, greedy(5, logprobs=5))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    tokens = [d.token_ids[0] for d in deltas]
    with torch.no_grad():
        logits = hf_model(model_dir)(torch.tensor([p + tokens])).logits[0].float()
    reference = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1)
    for step, d in enumerate(deltas):
        (lp,) = d.logprobs
        assert lp.token_id == tokens[step]
        assert lp.logprob == pytest.approx(reference[step, tokens[step]].item(), abs=1e-4)
        top_ids = reference[step].topk(5).indices.tolist()
        assert list(lp.top) == top_ids
        assert lp.top[top_ids[0]] == pytest.approx(lp.logprob, abs=1e-4)  # greedy = top-1


def test_repetition_penalty_matches_transformers(engine, model_dir, hf_model):
    (p,) = prompts(engine, [10], seed=5)
    ours = run_engine(engine, [p], greedy(30, repetition_penalty=1.8))["0"]
    theirs = hf_greedy(hf_model(model_dir), p, 30, repetition_penalty=1.8)
    assert ours == theirs
    assert ours != run_engine(make_engine(model_dir), [p], greedy(30))["0"]


def test_presence_and_frequency_penalties_reduce_repeats(engine, model_dir):
    (p,) = prompts(engine, [10], seed=6)
    plain = run_engine(engine, [p], greedy(60))["0"]
    penalised = run_engine(
        make_engine(model_dir), [p], greedy(60, frequency_penalty=2.0, presence_penalty=2.0)
    )["0"]
    assert len(set(penalised)) > len(set(plain))


def test_top_k_one_is_greedy_and_top_p_min_p_stay_in_support(engine, model_dir):
    (p,) = prompts(engine, [9], seed=7)
    reference = run_engine(engine, [p], greedy(20))["0"]
    top1 = run_engine(
        make_engine(model_dir),
        [p],
        SamplingParams(max_tokens=20, temperature=1.5, top_k=1, ignore_eos=True),
    )
    assert top1["0"] == reference
    tiny_p = run_engine(
        make_engine(model_dir),
        [p],
        SamplingParams(max_tokens=20, temperature=1.0, top_p=1e-6, ignore_eos=True),
    )
    assert tiny_p["0"] == reference
    full_min_p = run_engine(
        make_engine(model_dir),
        [p],
        SamplingParams(max_tokens=20, temperature=1.0, min_p=1.0, ignore_eos=True),
    )
    assert full_min_p["0"] == reference


def test_stop_token_ids_and_min_tokens(engine, model_dir):
    (p,) = prompts(engine, [11], seed=8)
    reference = run_engine(engine, [p], greedy(30))["0"]
    stop = reference[5]
    first = reference.index(stop)
    engine2 = make_engine(model_dir)
    engine2.add_request("r", p, greedy(30, stop_token_ids=[stop]))
    deltas = []
    while engine2.has_unfinished():
        deltas += engine2.step()
    assert [d.token_ids[0] for d in deltas] == reference[: first + 1]
    assert deltas[-1].finish_reason == "stop"
    # min_tokens suppresses the stop token until enough tokens were generated.
    late = run_engine(
        make_engine(model_dir), [p], greedy(30, stop_token_ids=[stop], min_tokens=first + 3)
    )["0"]
    assert len(late) >= first + 3 and stop not in late[: first + 3]


def test_max_tokens_finishes_with_length(engine):
    (p,) = prompts(engine, [5])
    engine.add_request("r", p, greedy(7))
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    assert len(deltas) == 7 and deltas[-1].finish_reason == "length"
    assert deltas[-1].num_prompt_tokens == 5 and deltas[-1].num_output_tokens == 7


@pytest.mark.parametrize(
    "params, message",
    [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=-3), "max_tokens"),
        (SamplingParams(temperature=-1.0), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_k=-5), "top_k"),
        (SamplingParams(n=0), "n must"),
        (SamplingParams(logprobs=100), "logprobs"),
        (SamplingParams(stop_token_ids=[10**9]), "stop_token_ids"),
    ],
)
def test_bad_parameters_fail_that_request_alone(engine, params, message):
    (good,) = prompts(engine, [8])
    engine.add_request("good", good, greedy(4))
    with pytest.raises(ValueError, match=message):
        engine.add_request("bad", good, params)
    out = []
    while engine.has_unfinished():
        out += engine.step()
    assert [d.request_id for d in out] == ["good"] * 4


def test_prompt_longer_than_context_is_rejected(model_dir):
    engine = make_engine(model_dir, max_model_len=64)
    with pytest.raises(ValueError, match="context is 64 tokens"):
        engine.add_request("long", list(range(3, 100)), greedy(4))
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", [], greedy(4))
    engine.add_request("ok", list(range(3, 40)), greedy(40))
    out = []
    while engine.has_unfinished():
        out += engine.step()
    assert (
        out[-1].finish_reason == "length"
        and out[-1].num_prompt_tokens + out[-1].num_output_tokens == 64
    )


def test_abort_frees_blocks_at_any_point(engine):
    p = prompts(engine, [40, 40, 40])
    for i, prompt in enumerate(p):
        engine.add_request(str(i), prompt, greedy(50))
    engine.step()
    assert engine.abort_request("1")  # running
    engine.step()
    assert engine.abort_request("0")
    assert engine.abort_request("2")
    assert not engine.abort_request("2") and not engine.abort_request("unknown")
    assert not engine.has_unfinished()
    assert engine.block_manager.num_used_blocks == 0


def test_seeded_tokens_are_the_same_after_a_pd_handoff(model_dir):
    """The prefill engine samples the first token, the decode engine the rest (its KV
    copied block by block, as Mooncake writes it between instances): a seeded request must
    give the tokens it gives in one engine."""
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=2024, ignore_eos=True)
    prefill, decode = make_engine(model_dir), make_engine(model_dir)
    (prompt,) = prompts(prefill, [37], seed=5)
    alone = run_engine(make_engine(model_dir), [prompt], params)["0"]

    _, tokens = handed_over(prefill, decode, prompt, params)
    assert tokens == alone


def test_seeded_tokens_are_the_same_when_resumed_from_the_streamed_ones(model_dir):
    """How the gateway resumes a request whose instance died: the tokens streamed so far
    are appended to the prompt and the rest is asked for, with the same seed."""
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=77, ignore_eos=True)
    engine = make_engine(model_dir)
    (prompt,) = prompts(engine, [29], seed=9)
    alone = run_engine(engine, [prompt], params)["0"]
    rest = SamplingParams(max_tokens=10, temperature=1.0, seed=77, ignore_eos=True)
    resumed = run_engine(make_engine(model_dir), [prompt + alone[:6]], rest)["0"]
    assert resumed == alone[6:]
