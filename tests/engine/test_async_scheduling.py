"""--async-scheduling (engine/async_step.py): step N+1 is scheduled while step N runs.

Every engine equality test runs with it too (the `overlap` fixture); these drive what only
happens mid-overlap — an abort, a preemption or a stop while the next step already runs
with the sequence in it — and check against the same run with synchronous steps: the same
tokens (none lost, none duplicated, none after a stop), and every block free at the end.
"""

from __future__ import annotations

import pytest
from conftest import greedy, make_engine, random_prompts

from xllm.protocol.types import SamplingParams


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


def drive(engine, requests, aborts=None):
    """Add `requests` ({id: (prompt, params)}) and step to the end, aborting request
    `aborts[k]` right after step call k. Returns ({id: tokens}, {id: finish reason},
    whether a step was running at each abort)."""
    aborts = aborts or {}
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str | None] = {}
    running_at_abort = []
    calls = 0
    while engine.has_unfinished():
        for delta in engine.step():
            assert reasons.get(delta.request_id) is None, "a token after the end"
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            reasons[delta.request_id] = delta.finish_reason
        calls += 1
        if calls in aborts:
            overlap = engine.overlap
            running_at_abort.append(overlap is not None and overlap.running is not None)
            assert engine.abort_request(aborts[calls])
    return tokens, reasons, running_at_abort


def both(model_dir, requests, aborts=None, **options):
    """`drive` with synchronous then async steps; asserts both free every block."""
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(model_dir, async_scheduling=async_scheduling, **options)
        results.append((engine, *drive(engine, requests, aborts)))
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        assert not engine.sequences
    return results


def test_aborts_mid_overlap_free_every_block_and_leave_the_rest_unchanged(model_dir):
    prompts = random_prompts([20, 33, 7, 50], 1000, seed=11)
    requests = {str(i): (p, greedy(30)) for i, p in enumerate(prompts)}
    aborts = {3: "1", 4: "3", 9: "0"}  # decoding, a prefill just done, later
    (_, sync, _, _), (_, ours, reasons, running) = both(model_dir, requests, aborts)
    assert all(running), "each abort hit a sequence of the step already running"
    assert ours == sync
    assert len(ours["2"]) == 30 and reasons["2"] == "length"
    assert len(ours["1"]) < 30 and len(ours["0"]) < 30


def test_preemption_mid_overlap_recomputes_the_same_tokens(model_dir):
    # 10 blocks of 16 tokens cannot hold five 30 + 40 token sequences: preempted while the
    # step scheduled before their preemption runs with them in it.
    prompts = random_prompts([30, 30, 30, 30, 12], 1000, seed=5)
    requests = {str(i): (p, greedy(40)) for i, p in enumerate(prompts)}
    (_, sync, _, _), (engine, ours, _, _) = both(
        model_dir, requests, num_kv_blocks=10, enable_prefix_caching=False
    )
    assert engine.scheduler.num_preemptions > 0
    assert ours == sync


def test_swapped_out_mid_overlap_comes_back_with_the_right_kv(model_dir):
    offline = random_prompts([40, 40, 40], 1000, seed=3)
    online = random_prompts([60, 60], 1000, seed=4)
    for async_scheduling in (False, True):
        engine = make_engine(
            model_dir, num_kv_blocks=16, swap_space_gb=0.01, async_scheduling=async_scheduling
        )
        for i, prompt in enumerate(offline):
            engine.add_request(f"off{i}", prompt, greedy(30), priority=1)
        outputs: dict[str, list[int]] = {}
        for n in range(1000):
            if not engine.has_unfinished():
                break
            if n == 5:
                for i, prompt in enumerate(online):
                    engine.add_request(f"on{i}", prompt, greedy(8))
            for delta in engine.step():
                outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        if not async_scheduling:
            expected = outputs
        assert engine.preemption_stats().num_swap_outs > 0
        assert engine.block_manager.num_free_blocks == 16
        assert len(engine.scheduler.free_host_blocks) == engine.swap_space.num_blocks
    assert outputs == expected


def test_a_stop_mid_overlap_drops_the_next_steps_token(model_dir):
    """Stop tokens picked from a plain run end sequences at chosen points while the others go
    on: the step already running with a stopped sequence in it must emit nothing for it."""
    prompts = random_prompts([15, 26, 9, 40], 1000, seed=7)
    plain = both(model_dir, {str(i): (p, greedy(24)) for i, p in enumerate(prompts)})[0][1]
    requests = {}
    for i, prompt in enumerate(prompts):
        stop_at = 3 + 4 * i
        stop = [plain[str(i)][stop_at]]
        params = SamplingParams(
            max_tokens=24, temperature=0.0, ignore_eos=True, stop_token_ids=stop
        )
        requests[str(i)] = (prompt, params)
    requests["len"] = (prompts[0], greedy(5))  # max_tokens: known ahead, never scheduled on
    (_, sync, sync_reasons, _), (_, ours, reasons, _) = both(model_dir, requests)
    assert ours == sync and reasons == sync_reasons
    for i in range(4):
        first_stop = plain[str(i)].index(requests[str(i)][1].stop_token_ids[0])
        assert ours[str(i)] == plain[str(i)][: first_stop + 1] and reasons[str(i)] == "stop"
    assert ours["len"] == plain["0"][:5] and reasons["len"] == "length"


def test_max_tokens_costs_no_extra_step(model_dir):
    """A sequence whose next token is its last is not scheduled past it: async steps run
    as many forward passes as synchronous ones, and none is left running."""
    (prompt,) = random_prompts([21], 1000, seed=2)
    (sync_engine, sync, _, _), (engine, ours, _, _) = both(model_dir, {"a": (prompt, greedy(9))})
    assert ours == sync
    assert engine.step_stats.num_steps == sync_engine.step_stats.num_steps == 9
    assert engine.overlap.running is None


def test_step_stats_count_the_hidden_scheduler_time(model_dir):
    prompts = random_prompts([10, 20, 30], 1000, seed=1)
    requests = {str(i): (p, greedy(20)) for i, p in enumerate(prompts)}
    (sync_engine, *_), (engine, *_) = both(model_dir, requests)
    sync_stats, stats = sync_engine.step_stats, engine.step_stats
    assert sync_stats.scheduler_seconds > 0 and sync_stats.hidden_scheduler_seconds == 0
    assert 0 < stats.hidden_scheduler_seconds <= stats.scheduler_seconds


def test_a_stop_mid_overlap_before_a_synchronous_step(model_dir):
    """A sequence stops in the running step while the step scheduled after it must run
    synchronously (a request of n = 2 arrives: its prompt's step forks): that step runs
    without the stopped sequence."""
    prompt, other = random_prompts([18, 25], 1000, seed=8)
    plain = both(model_dir, {"a": (prompt, greedy(20))})[0][1]["a"]
    first = plain.index(plain[6])
    stop = SamplingParams(
        max_tokens=20, temperature=0.0, ignore_eos=True, stop_token_ids=[plain[6]]
    )
    forks = SamplingParams(n=2, max_tokens=5, temperature=0.0, ignore_eos=True)
    results = []
    for async_scheduling in (False, True):
        engine = make_engine(model_dir, async_scheduling=async_scheduling)
        engine.add_request("a", prompt, stop)
        tokens: dict[tuple[str, int], list[int]] = {}
        ended: set[tuple[str, int]] = set()
        while engine.has_unfinished():
            for delta in engine.step():
                key = (delta.request_id, delta.index)
                assert key not in ended, "a token after the end"
                tokens.setdefault(key, []).extend(delta.token_ids)
                if delta.finish_reason is not None:
                    ended.add(key)
            # The step running now samples the stop token: n2 joins the step after it.
            if len(tokens.get(("a", 0), [])) == first and "n2" not in engine.sequences:
                engine.add_request("n2", other, forks)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
        results.append(tokens)
    assert results[1] == results[0]
    assert results[1][("a", 0)] == plain[: first + 1]
    assert len(results[1][("n2", 1)]) == 5
