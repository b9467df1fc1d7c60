"""PD disaggregation in the scheduler alone: reserve / admit_prefilled on the decode side,
prefill-only holding on the prefill side; no model, fake sampled tokens."""

from __future__ import annotations

from xllm.engine.block_manager import BlockManager
from xllm.engine.scheduler import Scheduler
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus
from xllm.protocol.types import SamplingParams

BS = 4


def make(num_blocks=16, budget=32):
    return Scheduler(BlockManager(num_blocks, BS), 8, budget, 256, eos_token_ids=[2])


def seq(rid, prompt, max_tokens=8, prefill_only=False):
    params = SamplingParams(max_tokens=max_tokens)
    return Sequence(rid, list(prompt), params, prefill_only=prefill_only)


def step(s: Scheduler, token: int = 5):
    out = s.schedule()
    s.update(out, {x.seq.seq_id: token for x in out.scheduled if x.samples})
    return out


def test_prefill_only_holds_its_blocks_after_the_first_token():
    s = make(budget=4)
    a = seq("a", range(10, 20), prefill_only=True)  # 10 tokens: 3 blocks, chunked 4+4+2
    s.add(a)
    for _ in range(3):
        step(s)
    assert a.status is SequenceStatus.HELD and a.num_output_tokens == 1
    assert len(a.block_table) == 3 and not s.running and not s.has_unfinished()
    assert s.schedule().is_empty  # never scheduled again
    s.finish(a, None)
    assert s.block_manager.num_used_blocks == 0


def test_prefill_only_that_finishes_at_once_frees_its_blocks():
    s = make()
    a = seq("a", range(10, 20), max_tokens=1, prefill_only=True)
    s.add(a)
    step(s)
    assert a.finish_reason is FinishReason.LENGTH and s.block_manager.num_used_blocks == 0


def test_reserve_reuses_the_cached_prefix_and_admit_decodes_from_the_first_token():
    s = make()
    warm = seq("w", range(10, 19))  # caches 2 full blocks
    s.add(warm)
    while s.has_unfinished():
        step(s)
    d = seq("d", [*range(10, 18), 50, 51, 52])  # shares the 2 blocks, 11 tokens
    assert s.reserve(d)
    assert d.status is SequenceStatus.HELD and d.num_cached_tokens == 8
    assert len(d.block_table) == 3 and s.block_manager.num_used_blocks == 3
    assert s.schedule().is_empty
    assert s.admit_prefilled(d, 7) is None
    table = list(d.block_table)
    out = step(s)
    assert [(x.seq.request_id, x.num_new_tokens, x.samples) for x in out.scheduled] == [
        ("d", 1, True)
    ]
    assert d.token_ids[11:] == [7, 5] and d.num_computed_tokens == 12
    assert d.block_table == table  # the first token's KV went into the reserved tail block
    step(s)  # position 12 starts a fourth block
    assert len(d.block_table) == 4


def test_admit_caches_the_transferred_full_blocks():
    s = make()
    d = seq("d", range(30, 39))  # 9 tokens: 2 full blocks + 1
    assert s.reserve(d) and d.num_cached_tokens == 0
    s.admit_prefilled(d, 7)
    assert sorted(s.block_manager.cached_blocks.values()) == sorted(d.block_table[:2])


def test_admit_with_a_final_first_token_finishes_and_frees():
    s = make()
    d = seq("d", range(30, 39), max_tokens=1)
    assert s.reserve(d)
    assert s.admit_prefilled(d, 7) is FinishReason.LENGTH
    assert d.is_finished and s.block_manager.num_used_blocks == 0


def test_reserve_fails_cleanly_when_the_pool_is_short():
    s = make(num_blocks=2)
    d = seq("d", range(30, 39))
    assert not s.reserve(d)
    assert d.block_table == [] and s.block_manager.num_free_blocks == 2


def test_finishing_a_reservation_frees_it():
    s = make()
    d = seq("d", range(30, 39))
    assert s.reserve(d)
    s.finish(d, FinishReason.ABORT)
    assert s.block_manager.num_used_blocks == 0
    s.block_manager.check_integrity()


def test_a_remotely_prefilled_sequence_preempted_later_is_recomputed_locally():
    s = make(num_blocks=4)
    a = seq("a", range(10, 13), max_tokens=6)  # 1 block, grows to 2
    s.add(a)
    step(s)
    d = seq("d", range(30, 39), max_tokens=4)  # 9 prompt tokens: the other 3 blocks
    assert s.reserve(d)
    s.admit_prefilled(d, 7)
    step(s)  # a decodes, d admitted and decodes its first token
    assert [q.request_id for q in s.running] == ["a", "d"]
    step(s)  # a needs a second block: d, admitted last, is preempted
    assert d.status is SequenceStatus.WAITING and d.block_table == []
    assert d.num_computed_tokens == 0 and d.num_output_tokens == 2
    while s.has_unfinished():
        step(s)
    assert a.num_output_tokens == 6 and d.num_output_tokens == 4
    assert s.num_preemptions == 1 and s.block_manager.num_used_blocks == 0
