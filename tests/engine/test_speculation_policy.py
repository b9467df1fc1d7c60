"""The adaptive rule: speculation runs where its measured yield beats its measured cost."""

from __future__ import annotations

import itertools
import random

import pytest

from xllm.engine.speculation import (
    EXPLORE_BUDGET,
    EXPLORE_EVERY,
    MAX_EXPLORE_EVERY,
    MIN_POINTS,
    AdaptiveSpeculation,
    LineFit,
    SpeculativeStep,
    exploration_interval,
    priced_interval,
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


def test_it_stays_off_when_drafts_are_rejected_and_explores_ever_more_rarely():
    policy = AdaptiveSpeculation(4)
    decisions = simulate(policy, batch=1, steps=6000, acceptance=0.0)
    on = [i for i, d in enumerate(decisions) if d]
    assert on[:MIN_POINTS] == list(range(MIN_POINTS))  # measured first, then off
    explorations = on[MIN_POINTS:]
    gaps = [b - a for a, b in itertools.pairwise(explorations)]
    assert len(gaps) >= 4
    # Each failed exploration doubles the wait (up to the cap): 7 of 6,000 steps at most.
    assert all(b == min(2 * a, MAX_EXPLORE_EVERY) for a, b in itertools.pairwise(gaps))
    assert len(explorations) <= 8 and policy.num_explorations == len(explorations)


def test_exploring_is_priced_by_what_the_worse_mode_loses():
    # The worse mode 5x slower: a step of it loses 4 steps, so at most one in 4 / budget.
    assert exploration_interval(EXPLORE_EVERY, 0.2) == pytest.approx(4 / EXPLORE_BUDGET)
    assert exploration_interval(EXPLORE_EVERY, 5.0) == pytest.approx(4 / EXPLORE_BUDGET)
    # Nearly a tie: exploring costs little, the interval only doubles.
    assert exploration_interval(EXPLORE_EVERY, 1.01) == 2 * EXPLORE_EVERY
    assert exploration_interval(MAX_EXPLORE_EVERY, 0.0) == MAX_EXPLORE_EVERY
    assert priced_interval(0.2) == pytest.approx(4 / EXPLORE_BUDGET)  # (the first one too)


def test_it_turns_on_at_batch_one_when_most_drafts_are_kept():
    policy = AdaptiveSpeculation(4)
    decisions = simulate(policy, batch=1, steps=300, acceptance=0.8)
    assert sum(decisions[MIN_POINTS * 2 :]) >= len(decisions) - MIN_POINTS * 2 - 3
    assert policy.speculating


def test_it_is_off_at_a_large_batch_where_verify_rows_cost_more_than_they_save():
    # 80% kept, yet at 64 sequences the 256 verify rows cost 5x a plain step: off from the
    # moment both modes are measured, save the (rare) explorations.
    policy = AdaptiveSpeculation(4)
    decisions = simulate(policy, batch=64, steps=1000, acceptance=0.8)
    assert sum(decisions) <= MIN_POINTS + 4
    assert not policy.speculating


def test_the_same_costs_decide_by_the_measured_acceptance():
    kept = simulate(AdaptiveSpeculation(4), batch=2, steps=200, acceptance=0.8)
    rejected = simulate(AdaptiveSpeculation(4), batch=2, steps=200, acceptance=0.1)
    assert sum(kept[-100:]) >= 98 and sum(rejected[-100:]) <= 2


def test_a_changed_batch_flips_the_pick_and_restarts_the_intervals():
    policy = AdaptiveSpeculation(4)
    simulate(policy, batch=1, steps=200)
    simulate(policy, batch=64, steps=2000)
    grown = policy.explore_interval
    assert grown > 4 * EXPLORE_EVERY and not policy.speculating
    assert all(simulate(policy, batch=1, steps=10))  # (the lines predict batch 1 too)
    assert policy.explore_interval < grown


def test_an_exploration_on_a_step_that_prefilled_runs_again_on_the_next():
    policy = AdaptiveSpeculation(4)
    simulate(policy, batch=1, steps=200, acceptance=0.0)  # off; explorations spaced out
    explored = policy.num_explorations
    while not policy.num_draft_tokens(1):  # plain steps until the next exploration
        policy.record(SpeculativeStep(1, 1, 0, 0, 0, plain_seconds(1)))
    policy.record(SpeculativeStep(1, 5, 4, num_prefill_tokens=100, seconds=1.0))
    assert policy.num_draft_tokens(1) and policy.exploring  # tried again: it was not measured
    policy.record(SpeculativeStep(1, 5, 4, 0, 0, speculative_seconds(5)))
    assert policy.num_explorations == explored + 1
    assert not policy.num_draft_tokens(1)


# A draft model on the same CPU-like costs: each draft is one more pass of it, and what it
# prefills (its mirror of a prompt, its catch-up after steps off) costs per token.
DRAFT_PASS_SECONDS = 0.002
DRAFT_PREFILL_SECONDS = 0.0005  # per token: catching up on 300 tokens ~ 14 plain steps
PROMPT = 256


def simulate_draft(policy: AdaptiveSpeculation, steps: int, acceptance: float) -> tuple[float, int]:
    """One sequence of a PROMPT-token prompt decoding `steps` steps with a draft model that
    computes nothing while off and catches up when on (draft_model.py): seconds, and the
    tokens generated."""
    k = policy.num_draft_tokens(1)
    mirror = PROMPT * DRAFT_PREFILL_SECONDS if k else 0.0
    seconds = 0.002 * PROMPT + mirror
    policy.record(
        SpeculativeStep(
            0, 0, 0, PROMPT, 0, seconds, 0.0, mirror, PROMPT if k else 0, context_tokens=PROMPT
        )
    )
    total, context, draft_valid = seconds, PROMPT, PROMPT if k else 0
    for _ in range(steps):
        k = policy.num_draft_tokens(1)
        if not k:
            seconds, accepted, catch_up, lag = plain_seconds(1), 0, 0.0, 0
        else:
            lag = context - draft_valid
            catch_up = lag * DRAFT_PREFILL_SECONDS
            accepted = int(acceptance * k)
            seconds = speculative_seconds(1 + k) + k * DRAFT_PASS_SECONDS + catch_up
        step = SpeculativeStep(1, 1 + k, k, 0, accepted, seconds, catch_up, catch_up, lag)
        step.context_tokens = context
        policy.record(step)
        total += seconds
        context += 1 + accepted
        draft_valid = context if k else draft_valid
    return total, context - PROMPT


def test_a_draft_that_agrees_on_nothing_costs_under_2_percent_catch_ups_included():
    steps = 2000
    off = 0.002 * PROMPT + steps * plain_seconds(1)  # the prefill, then a token a step
    policy = AdaptiveSpeculation(4)
    seconds, tokens = simulate_draft(policy, steps, acceptance=0.0)
    assert tokens == steps and seconds < 1.02 * off
    assert not policy.speculating
    # The same draft agreeing on 3 drafts of 4: on, and well ahead per token.
    policy = AdaptiveSpeculation(4)
    seconds, tokens = simulate_draft(policy, steps, acceptance=0.8)
    assert seconds / tokens < 0.75 * plain_seconds(1)
    assert policy.speculating


def test_a_verify_dearer_than_its_tokens_say_is_turned_off():
    # 4 sequences, each with 4 drafts in 3 steps of 10 (the rest: none found), 60% kept.
    # What a step's token count does not show: each verifying sequence's own pass (4 ms),
    # and the proposer's time (4 ms) on every step the switch speculates, drafts or not.
    # Speculating loses ~15% here; off all along is the figure to keep within 2% of.
    rng = random.Random(0)
    policy, batch, k = AdaptiveSpeculation(4), 4, 4
    seconds = tokens = on = 0
    for _ in range(500):
        if policy.num_draft_tokens(batch):
            verifying = sum(rng.random() < 0.3 for _ in range(batch))
            drafts, accepted = verifying * k, int(0.6 * verifying * k)
            step_seconds = 0.004 + 0.010 + 0.0005 * (batch + drafts) + 0.004 * verifying
            on += 1
        else:
            drafts = accepted = 0
            step_seconds = plain_seconds(batch)
        policy.record(SpeculativeStep(batch, batch + drafts, drafts, 0, accepted, step_seconds))
        seconds, tokens = seconds + step_seconds, tokens + batch + accepted
    assert on <= MIN_POINTS + 500 // EXPLORE_EVERY
    assert seconds / tokens < 1.02 * plain_seconds(batch) / batch
    assert not policy.speculating
