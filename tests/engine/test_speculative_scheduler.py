"""The scheduler's side of speculative decoding, without a model: drafts within bounds, the
kept tokens appended with the stop checks, the blocks past the tokens freed."""

from __future__ import annotations

from xllm.engine.block_manager import BlockManager, cdiv
from xllm.engine.proposer import Proposer
from xllm.engine.scheduler import Scheduler
from xllm.engine.sequence import FinishReason, Sequence
from xllm.protocol import SamplingParams

EOS = 2
BLOCK = 4


class FixedDrafts(Proposer):
    """Proposes 7, 8, 9, ... (as many as allowed)."""

    def __init__(self):
        self.asked: list[int] = []

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        self.asked.append(max_tokens)
        return list(range(7, 7 + max_tokens))


def make(num_blocks=64, budget=32, max_model_len=256, proposer=None):
    bm = BlockManager(num_blocks, BLOCK)
    return Scheduler(
        bm, 8, budget, max_model_len, eos_token_ids=[EOS], proposer=proposer or FixedDrafts()
    )


def decoding(s: Scheduler, n_prompt=6, **params) -> Sequence:
    """A sequence past its prefill (first token 5 sampled)."""
    params.setdefault("max_tokens", 32)
    seq = Sequence("a", list(range(100, 100 + n_prompt)), SamplingParams(**params))
    s.add(seq)
    out = s.schedule(4)
    assert not out.scheduled[0].draft_token_ids  # a prefill never speculates
    s.update(out, {seq.seq_id: 5})
    return seq


def test_a_decoding_sequence_gets_its_drafts_and_their_slots():
    s = make()
    seq = decoding(s)
    out = s.schedule(4)
    (item,) = out.scheduled
    assert item.draft_token_ids == [7, 8, 9, 10] and item.num_new_tokens == 5 and item.samples
    assert seq.token_ids[-1] == 5  # the drafts are not in the tokens
    assert len(seq.block_table) == cdiv(seq.num_tokens + 4, BLOCK)


def test_without_k_the_step_is_plain():
    s = make()
    decoding(s)
    (item,) = s.schedule().scheduled
    assert item.num_new_tokens == 1 and not item.draft_token_ids


def test_drafts_fit_the_budget_max_tokens_and_context():
    proposer = FixedDrafts()
    s = make(budget=3, proposer=proposer)
    decoding(s, n_prompt=3)
    assert s.schedule(4).scheduled[0].draft_token_ids == [7, 8]  # budget 3 = 1 + 2 drafts
    s = make(proposer=proposer)
    decoding(s, max_tokens=3)  # 1 output so far; 2 more: 1 draft + the target's token
    assert s.schedule(4).scheduled[0].draft_token_ids == [7]
    s = make(max_model_len=9, proposer=proposer)
    decoding(s)  # 7 tokens of 9: 1 draft + the target's token fill the context
    assert s.schedule(4).scheduled[0].draft_token_ids == [7]


def test_ineligible_requests_do_not_speculate():
    for params in ({"logprobs": 0}, {"repetition_penalty": 1.2}, {"min_tokens": 5}):
        s = make()
        decoding(s, **params)
        assert not s.schedule(4).scheduled[0].draft_token_ids, params


def test_drafts_never_preempt_they_shrink_to_a_plain_decode():
    s = make(num_blocks=2)  # 8 slots: the 7 tokens fit, 7 + 4 drafts do not
    seq = decoding(s)
    (item,) = s.schedule(4).scheduled
    assert item.num_new_tokens == 1 and not item.draft_token_ids
    assert s.num_preemptions == 0 and seq in s.running


def test_drafts_never_take_the_block_a_later_decode_needs():
    s = make(num_blocks=4)
    a = Sequence("a", [100, 101, 102], SamplingParams(max_tokens=32))
    b = Sequence("b", [200, 201, 202], SamplingParams(max_tokens=32))
    s.add(a)
    s.add(b)
    out = s.schedule(4)
    s.update(out, {a.seq_id: 5, b.seq_id: 5})  # 4 tokens each: 2 blocks used, 2 free
    # a's drafts would take both free blocks, and b's decode then none: they shrink instead.
    out = s.schedule(4)
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 1), ("b", 1)]
    assert s.num_preemptions == 0


def test_update_appends_the_kept_tokens_and_frees_the_tail():
    s = make()
    seq = decoding(s)  # 7 tokens: 2 blocks
    out = s.schedule(4)  # drafts 7 8 9 10 at positions 7..10: 3 blocks
    assert len(seq.block_table) == 3
    s.update(out, {}, {seq.seq_id: [7, 3]})  # one draft kept, then the target's 3
    assert seq.token_ids[-3:] == [5, 7, 3]
    assert seq.num_computed_tokens == seq.num_tokens - 1 == 8
    assert len(seq.block_table) == cdiv(seq.num_tokens, BLOCK) == 3
    assert (seq.num_draft_tokens, seq.num_accepted_draft_tokens) == (4, 1)
    s.block_manager.check_integrity()
    out = s.schedule(4)
    s.update(out, {}, {seq.seq_id: [11]})  # nothing kept: 10 tokens, 3 blocks, none past
    assert seq.num_computed_tokens == 9 and len(seq.block_table) == 3
    assert s.block_manager.num_free_blocks == 64 - 3


def test_rejected_drafts_never_enter_the_prefix_cache():
    s = make()
    seq = decoding(s, n_prompt=3)  # 4 tokens: block 0 full
    out = s.schedule(4)  # positions 4..7 hold drafts: block 1 filled by them
    s.update(out, {}, {seq.seq_id: [1]})  # all rejected
    cached = {b.block_id for b in s.block_manager.blocks if b.block_hash is not None}
    assert cached == {seq.block_table[0]}


def test_a_stop_token_among_the_kept_ones_drops_the_rest():
    s = make()
    seq = decoding(s)
    out = s.schedule(4)
    s.update(out, {}, {seq.seq_id: [7, EOS, 9]})
    assert seq.finish_reason is FinishReason.STOP and seq.output_token_ids == [5, 7, EOS]
    assert s.block_manager.num_free_blocks == 64
    assert not s.has_unfinished()


def test_max_tokens_is_checked_token_by_token():
    s = make()
    seq = decoding(s, max_tokens=3, ignore_eos=True)
    out = s.schedule(4)
    s.update(out, {}, {seq.seq_id: [7, 8]})
    assert seq.finish_reason is FinishReason.LENGTH and seq.num_output_tokens == 3
