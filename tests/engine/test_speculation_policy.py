"""The adaptive rule: speculation runs where its measured yield beats its measured cost."""

from __future__ import annotations

import pytest

from xllm.engine.speculation import (
    EXPLORE_EVERY,
    AdaptiveSpeculation,
    LineFit,
    SpeculativeStep,
    speculation_pays,
)


def fit(points) -> LineFit:
    line = LineFit()
    for x, y in points:
        line.add(x, y)
    return line


# A CPU-like cost model: a plain decode step costs 10 ms + 0.5 ms per sequence; verifying is
# dearer per token (2 ms: each sequence runs the chunk attention path on its own).
def plain_seconds(batch: int) -> float:
    return 0.010 + 0.0005 * batch


def speculative_seconds(tokens: int) -> float:
    return 0.010 + 0.002 * tokens


PLAIN = fit((b, plain_seconds(b)) for b in (1, 2, 4, 8, 16, 32))
SPECULATIVE = fit((t, speculative_seconds(t)) for t in (3, 5, 10, 20, 40))


def test_line_fit_recovers_a_line_and_holds_a_single_point():
    assert PLAIN.predict(64) == pytest.approx(plain_seconds(64))
    # (Means are weighted: the newer point counts a little more.)
    assert fit([(1, 0.02), (1, 0.04)]).predict(50) == pytest.approx(0.03, rel=0.02)
    assert fit([(1, 0.05), (10, 0.01)]).predict(20) == pytest.approx(0.03, rel=0.02)  # slope 0


def test_speculation_pays_at_batch_one_and_not_at_a_large_batch():
    # 80% of 4 drafts kept: 4.2 tokens per sequence per step for 5 rows.
    assert speculation_pays(1, 0.8, 4.0, PLAIN, SPECULATIVE)
    assert not speculation_pays(64, 0.8, 4.0, PLAIN, SPECULATIVE)


def test_speculation_does_not_pay_when_drafts_are_rejected():
    assert not speculation_pays(1, 0.0, 4.0, PLAIN, SPECULATIVE)


def simulate(policy: AdaptiveSpeculation, batch: int, steps: int, acceptance=0.8) -> list[bool]:
    decisions = []
    for _ in range(steps):
        k = policy.num_draft_tokens(batch)
        decisions.append(k > 0)
        drafts = batch * k
        tokens = batch + drafts
        seconds = speculative_seconds(tokens) if k else plain_seconds(batch)
        policy.record(SpeculativeStep(batch, tokens, drafts, 0, int(acceptance * drafts), seconds))
    return decisions


def test_the_controller_turns_itself_off_at_large_batch_and_on_at_batch_one():
    policy = AdaptiveSpeculation(4)
    on_small = simulate(policy, batch=1, steps=200)[-100:]
    assert sum(on_small) >= 100 - 100 // EXPLORE_EVERY - 1
    on_large = simulate(policy, batch=64, steps=300)[-100:]
    assert sum(on_large) <= 100 // EXPLORE_EVERY + 1  # only the exploration steps
    assert sum(simulate(policy, batch=1, steps=300)[-100:]) >= 100 - 100 // EXPLORE_EVERY - 1


def test_not_adaptive_always_speculates_and_prefill_steps_are_not_measured():
    policy = AdaptiveSpeculation(3, adaptive=False)
    assert all(policy.num_draft_tokens(128) == 3 for _ in range(10))
    policy.record(SpeculativeStep(4, 16, 12, num_prefill_tokens=500, seconds=1.0))
    assert policy.speculative.count == policy.plain.count == 0
