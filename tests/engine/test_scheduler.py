"""The scheduler alone, without a model: feed it fake sampled tokens and check its queues."""

from __future__ import annotations

from xllm.engine.block_manager import BlockManager
from xllm.engine.scheduler import Scheduler
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus
from xllm.protocol.types import SamplingParams

EOS = 2


def make(num_blocks=64, block_size=4, max_num_seqs=8, budget=32, max_model_len=256):
    bm = BlockManager(num_blocks, block_size)
    return Scheduler(bm, max_num_seqs, budget, max_model_len, eos_token_ids=[EOS])


def seq(rid, n_prompt, max_tokens=8, **kw):
    base = 100 * (ord(rid[0]) - ord("a") + 1)  # distinct prompts: no accidental prefix hits
    return Sequence(
        rid, [base + i for i in range(n_prompt)], SamplingParams(max_tokens=max_tokens, **kw)
    )


def step(s: Scheduler, token: int = 5):
    out = s.schedule()
    sampled = {x.seq.seq_id: token for x in out.scheduled if x.samples}
    sampled.update({child.seq_id: token for _, child in out.forks})
    s.update(out, sampled)
    return out


def test_chunked_prefill_respects_budget_and_runs_decodes_first():
    s = make(budget=10)
    a, b = seq("a", 3), seq("b", 25)
    s.add(a)
    s.add(b)
    out = step(s)
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 3), ("b", 7)]
    out = step(s)
    # a decodes (1 token) before b's next chunk takes the rest of the budget.
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 9)]
    assert b.num_computed_tokens == 16 and b.num_output_tokens == 0
    out = step(s)
    assert [(x.seq.request_id, x.num_new_tokens, x.samples) for x in out.scheduled] == [
        ("a", 1, True),
        ("b", 9, True),
    ]
    assert b.num_output_tokens == 1


def test_max_num_seqs_caps_the_batch():
    s = make(max_num_seqs=2)
    for r in "abc":
        s.add(seq(r, 4))
    out = step(s)
    assert [x.seq.request_id for x in out.scheduled] == ["a", "b"]
    assert [q.request_id for q in s.waiting] == ["c"]


def test_preemption_takes_the_newest_and_requeues_it_first():
    # 4 blocks of 4 tokens: two 6-token prompts fit (2 blocks each), growth does not.
    s = make(num_blocks=4, block_size=4, budget=64)
    a, b = seq("a", 6, max_tokens=20), seq("b", 6, max_tokens=20)
    s.add(a)
    s.add(b)
    step(s)  # prefill: positions 0-5 computed, 7 tokens each
    step(s)
    step(s)  # positions 6 and 7: still 2 blocks each
    assert s.num_preemptions == 0
    step(s)  # a's position 8 needs a 3rd block: b is preempted
    assert s.num_preemptions == 1
    assert b.status is SequenceStatus.WAITING and b.num_computed_tokens == 0 and not b.block_table
    assert s.waiting[0] is b
    assert b.num_output_tokens == 3, "generated tokens are kept and recomputed"


def test_eos_min_tokens_and_ignore_eos():
    s = make()
    plain, patient, stubborn = seq("p", 3), seq("m", 3, min_tokens=2), seq("i", 3, ignore_eos=True)
    for x in (plain, patient, stubborn):
        s.add(x)
    step(s, token=EOS)
    assert plain.finish_reason is FinishReason.STOP
    assert patient.status is SequenceStatus.RUNNING and stubborn.status is SequenceStatus.RUNNING
    step(s, token=EOS)
    assert patient.finish_reason is FinishReason.STOP and stubborn.status is SequenceStatus.RUNNING
    assert s.block_manager.num_used_blocks == len(stubborn.block_table)


def test_forks_are_made_when_the_prompt_completes():
    s = make(budget=4)
    parent = seq("r", 6, n=3)
    s.add(parent)
    out = step(s)
    assert not out.forks  # 4 of 6 prompt tokens
    out = step(s)
    assert [child.index for _, child in out.forks] == [1, 2]
    assert len(out.block_copies) == 2  # 6 tokens = 1 full + 1 partial block
    assert [x.index for x in s.running] == [0, 1, 2]
    assert all(x.num_output_tokens == 1 for x in s.running)
