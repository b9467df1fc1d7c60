"""The engine's step measurements that heartbeats carry to the SLO-aware PD policy."""

from __future__ import annotations

import pytest

from tests.engine.conftest import greedy, make_engine
from xllm.engine.step_stats import TPOT_EWMA_WEIGHT, record_step
from xllm.protocol import StepStats


def test_step_time_is_split_by_token_share_and_decode_steps_feed_the_tpot_average():
    s = StepStats()
    record_step(s, 1.0, num_prefill_tokens=99, num_decodes=1)
    assert (s.prefill_tokens, s.prefill_seconds) == (99, pytest.approx(0.99))
    assert (s.decode_steps, s.decode_seconds, s.recent_tpot) == (1, 1.0, 1.0)
    record_step(s, 0.5, num_prefill_tokens=0, num_decodes=4)
    assert s.prefill_seconds == pytest.approx(0.99)
    assert s.recent_tpot == pytest.approx(1.0 + TPOT_EWMA_WEIGHT * (0.5 - 1.0))
    record_step(s, 0.2, num_prefill_tokens=0, num_decodes=0)  # empty: ignored
    assert s.decode_steps == 2


def test_recent_prefill_time_per_token_weighs_steps_by_their_tokens():
    s = StepStats()
    record_step(s, 1.0, num_prefill_tokens=1000, num_decodes=0)  # first: taken as is
    assert s.recent_prefill_seconds_per_token == pytest.approx(1e-3)
    record_step(s, 0.1, num_prefill_tokens=10, num_decodes=0)  # 10 ms/token, but 10 tokens
    assert s.recent_prefill_seconds_per_token == pytest.approx(1e-3 + 10 / 8192 * 9e-3)
    for _ in range(20):
        record_step(s, 4.0, num_prefill_tokens=2000, num_decodes=0)
    assert s.recent_prefill_seconds_per_token == pytest.approx(2e-3, rel=0.01)


def test_engine_counts_prefill_tokens_first_tokens_and_the_backlog(tiny_model_dir):
    engine = make_engine(tiny_model_dir("qwen3"), max_num_batched_tokens=64)
    engine.add_request("a", list(range(1, 101)), greedy(3))  # 100 tokens: 2 chunks
    engine.add_request("b", list(range(200, 220)), greedy(3))  # no shared prefix
    assert engine.load_stats().num_prefill_backlog_tokens == 120
    engine.step()  # a's first 64 tokens
    assert engine.load_stats().num_prefill_backlog_tokens == 56
    while engine.has_unfinished():
        engine.step()
    s = engine.step_stats
    assert s.prefill_tokens == 120 - 64  # the first step is left out (one-time costs)
    assert s.recent_prefill_seconds_per_token > 0
    assert s.ttft_count == 2 and s.ttft_seconds > 0
    assert s.decode_steps >= 2 and s.recent_tpot > 0
    assert engine.load_stats().num_prefill_backlog_tokens == 0
