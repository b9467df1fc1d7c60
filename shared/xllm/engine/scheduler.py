"""Scheduler: continuous batching with chunked prefill under a per-step token budget.

Each step gets `max_num_batched_tokens` tokens to spend. Running sequences are served
first (their decode tokens, or the next chunk of a prefill in progress), then waiting
ones are admitted in arrival order while budget, `max_num_seqs` and KV blocks allow.

Invariant (vLLM v1's): for every scheduled sequence the step computes tokens
[num_computed_tokens, num_computed_tokens + num_new_tokens) of `token_ids`; a sequence
samples a token only when that range reaches `num_tokens`. When blocks run out, the most
recently admitted running sequence is preempted: its blocks are freed and it goes back
to the front of the queue to be recomputed (its prefix may still hit the cache).

PD disaggregation adds sequences that hold blocks outside both queues (status HELD): a
decode-side reservation whose prompt KV another instance writes, and a prefill-only
sequence whose blocks wait to be sent. The scheduler never schedules or preempts them.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from xllm.engine.block_manager import BlockManager
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    samples: bool
    """This step reaches the end of the sequence's tokens, so it samples the next one."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    """(parent, child) pairs made this step; the child samples from the parent's logits."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) KV block copies to run after the forward pass (forks' partial blocks)."""

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
    ):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # -- schedule -------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new):
                break  # `seq` itself was preempted; everything after it already was
            self._schedule(out, seq, num_new)
            budget -= num_new
            i += 1
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if len(self.running) + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            if seq.block_table:  # prefilled remotely: its prompt KV is in its blocks
                cached, num_cached_tokens = [], seq.num_computed_tokens
            else:
                cached = self.block_manager.find_cached_prefix(seq)
                num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached_tokens, budget)
            extra = self._fork_blocks(seq, num_cached_tokens + num_new)
            if not self.block_manager.allocate(seq, num_new, cached, extra):
                break
            self.waiting.popleft()
            if seq.num_output_tokens == 0:  # count prompts, not recomputes
                self.block_manager.record_lookup(seq.num_tokens, num_cached_tokens)
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._schedule(out, seq, num_new)
            budget -= num_new
        return out

    def _allocate_or_preempt(self, seq: Sequence, num_new: int) -> bool:
        extra = self._fork_blocks(seq, seq.num_computed_tokens + num_new)
        while not self.block_manager.allocate(seq, num_new, num_extra_blocks=extra):
            victim = self.running.pop()
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _fork_blocks(self, seq: Sequence, computed_after_step: int) -> int:
        """Blocks the forks made when this step completes `seq`'s prompt will need."""
        if seq.num_pending_forks == 0 or computed_after_step < seq.num_tokens:
            return 0
        partial = seq.num_tokens % self.block_manager.block_size != 0
        return seq.num_pending_forks if partial else 0

    def _schedule(self, out: SchedulerOutput, seq: Sequence, num_new: int) -> None:
        samples = seq.num_computed_tokens + num_new == seq.num_tokens
        item = ScheduledSeq(seq, num_new, samples)
        out.scheduled.append(item)
        if item.samples and seq.num_pending_forks:
            for index in range(seq.params.n - seq.num_pending_forks, seq.params.n):
                child = seq.fork(index)
                copy = self.block_manager.fork(seq, child)
                if copy is not None:
                    out.block_copies.append(copy)
                out.forks.append((seq, child))
            seq.num_pending_forks = 0

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    # -- after the step -------------------------------------------------------------------

    def update(self, out: SchedulerOutput, sampled: dict[tuple[str, int], int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, retire finished sequences.

        `sampled` maps seq_id -> token for every sequence that sampled this step,
        forks included. Returns the sequences that sampled, in a stable order.
        """
        sampled_seqs: list[Sequence] = []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq)
            if item.samples:
                sampled_seqs.append(seq)
        for parent, siblings in itertools.groupby(out.forks, key=lambda fork: fork[0]):
            children = [child for _, child in siblings]
            for child in children:
                child.num_computed_tokens = parent.num_computed_tokens
            at = self.running.index(parent) + 1
            self.running[at:at] = children
            sampled_seqs.extend(children)
        for seq in sampled_seqs:
            seq.token_ids.append(sampled[seq.seq_id])
            reason = self._finish_reason(seq)
            if reason is not None:
                self.finish(seq, reason)
            elif seq.prefill_only:
                self.running.remove(seq)
                seq.status = SequenceStatus.HELD  # until its blocks are sent
        return sampled_seqs

    def _finish_reason(self, seq: Sequence) -> FinishReason | None:
        params = seq.params
        token = seq.token_ids[-1]
        if seq.num_output_tokens >= params.min_tokens and (
            (not params.ignore_eos and token in self.eos_token_ids)
            or token in params.stop_token_ids
        ):
            return FinishReason.STOP
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def finish(self, seq: Sequence, reason: FinishReason | None) -> None:
        """Retire `seq` wherever it is and release its blocks (also used for aborts).

        `reason` is None only for a prefilled sequence released after its transfer: the
        request goes on elsewhere."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    # -- PD disaggregation: blocks held outside the queues ---------------------------------

    def reserve(self, seq: Sequence) -> bool:
        """Decode side: give `seq` blocks for its whole prompt, reusing the cached prefix,
        and hold them unscheduled until `admit_prefilled`. False if the pool is short."""
        cached = self.block_manager.find_cached_prefix(seq)
        num_cached_tokens = len(cached) * self.block_manager.block_size
        if not self.block_manager.allocate(seq, seq.num_tokens - num_cached_tokens, cached):
            return False
        self.block_manager.record_lookup(seq.num_tokens, num_cached_tokens)
        seq.num_cached_tokens = seq.num_computed_tokens = num_cached_tokens
        seq.status = SequenceStatus.HELD
        return True

    def admit_prefilled(self, seq: Sequence, first_token_id: int) -> FinishReason | None:
        """Decode side: the prompt's KV has arrived in `seq`'s reserved blocks and the prefill
        side sampled `first_token_id`. Queue `seq` to decode (first in line: it already
        holds its blocks), or finish it if that token ends it; returns the finish reason."""
        assert seq.status is SequenceStatus.HELD and seq.num_output_tokens == 0, seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_full_blocks(seq)
        seq.token_ids.append(first_token_id)
        reason = self._finish_reason(seq)
        if reason is not None:
            self.finish(seq, reason)
            return reason
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        return None
