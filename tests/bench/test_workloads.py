"""Workloads: prompt lengths, determinism, shared Mooncake prefixes, trace arrivals."""

from __future__ import annotations

import pytest

from xllm.cli.bench.workloads import (
    SAFE_TOKEN_IDS,
    LengthRange,
    PromptMaker,
    multiturn_workload,
    random_workload,
    sharegpt_workload,
    trace_workload,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tiny_model_dir):
    return tiny_model_dir("qwen3", "float32")


def test_random_id_prompts_have_exactly_their_length():
    maker = PromptMaker(None, chat=False)
    requests = random_workload(50, LengthRange(1, 300), LengthRange(5, 9), maker, seed=7)
    assert all(len(r.prompt) == r.input_len for r in requests)
    assert all(t in SAFE_TOKEN_IDS for r in requests for t in r.prompt)
    assert all(5 <= r.output_len <= 9 and r.arrival is None for r in requests)
    again = random_workload(50, LengthRange(1, 300), LengthRange(5, 9), maker, seed=7)
    assert again == requests  # seeded


def test_chat_text_is_about_n_tokens(tokenizer_dir):
    from xllm.tokenizer import Tokenizer

    tokenizer = Tokenizer(tokenizer_dir)
    for maker in (PromptMaker(tokenizer_dir, chat=True), PromptMaker(None, chat=True)):
        requests = random_workload(10, LengthRange(200, 200), LengthRange(1, 1), maker)
        counts = [len(tokenizer.encode(r.prompt, add_special_tokens=False)) for r in requests]
        assert all(isinstance(r.prompt, str) for r in requests)
        assert all(180 <= n <= 240 for n in counts), counts


def test_mooncake_requests_share_prefixes_block_by_block():
    maker = PromptMaker(None, chat=False)
    requests = trace_workload("mooncake", maker, limit=2, length_scale=1 / 64)
    block = 8  # 512 tokens per hash id, scaled by 1/64
    first, second = (r.prompt for r in requests)  # hash ids [0, 1, ...] and [0, 14, ...]
    assert first[:block] == second[:block]
    assert first[block : 2 * block] != second[block : 2 * block]
    assert [len(r.prompt) for r in requests] == [r.input_len for r in requests]


def test_trace_workload_keeps_the_trace_times():
    maker = PromptMaker(None, chat=False)
    requests = trace_workload("azure-code", maker, limit=5, length_scale=0.01, time_scale=2.0)
    assert requests[0].arrival == 0.0
    assert requests[1].arrival == pytest.approx(0.104)  # 52 ms apart in the trace, x2
    assert [len(r.prompt) for r in requests] == [r.input_len for r in requests]


def test_sharegpt_prompts_are_real_text(tokenizer_dir):
    requests = sharegpt_workload(5, LengthRange(16, 16), PromptMaker(tokenizer_dir, chat=False))
    assert len({r.prompt for r in requests}) == 5
    assert all(isinstance(r.prompt, str) and r.input_len > 0 for r in requests)


def test_multiturn_turns_extend_their_session_a_round_apart():
    maker = PromptMaker(None, chat=False, seed=3)
    requests = multiturn_workload(3, 4, 64, 16, 8, maker)
    assert len(requests) == 12
    assert [r.input_len for r in requests[:3]] == [80] * 3  # context + first message
    assert [len(r.prompt) for r in requests] == [r.input_len for r in requests]
    assert all(r.output_len == 8 and r.arrival is None for r in requests)
    for i, r in enumerate(requests[3:], start=3):
        previous = requests[i - 3]  # the same session, one round before
        assert r.prompt[: previous.input_len] == previous.prompt
        assert r.input_len == previous.input_len + 8 + 16  # the reply stand-in, a message
    contexts = [tuple(r.prompt[:64]) for r in requests[:3]]
    assert len(set(contexts)) == 3  # sessions share nothing
    assert multiturn_workload(3, 4, 64, 16, 8, PromptMaker(None, chat=False, seed=3)) == requests
