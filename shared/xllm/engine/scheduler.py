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

Priority (report §3.1, online/offline co-location): a sequence's `priority` is 0 (online)
or more (offline). Both queues keep online sequences ahead of offline ones, so online work
is served first and offline work fills what is left of the token budget, the sequence
slots and the KV pool; an offline prefill gets chunks only from that remainder, so online
arrivals interrupt it at chunk boundaries. Preemption takes from the tail of `running`,
offline first; an online request that cannot be admitted preempts running offline ones.
A preempted offline sequence keeps its KV when the host swap space has room: its computed
blocks are copied out (`SchedulerOutput.swap_out`, run by the engine before the forward
pass) and it waits in `swapped` until room returns, when it is copied back in before any
offline request is admitted; otherwise it is recomputed like an online one. Swap-outs and
swap-ins never share a step, so no copy reads a block another copy of the step writes.
Without offline work none of this costs more than a comparison per admitted sequence.

Beam search (beam_search.py): a beam samples like any sequence, but `update` appends no
token to it; its group does, once all its beams sampled, and forks new beams into
`running` (`adopt`). Until then a beam has nothing to compute and is skipped.

Speculative decoding (`schedule(num_draft_tokens=k)`, k > 0, with a proposer): a decoding
sequence with drafts is scheduled for 1 + d tokens — its last token, then d drafts
(`speculation.draft_room` bounds d) — with slots for all; the drafts ride on
`ScheduledSeq.draft_token_ids`, not in `token_ids`, and never preempt anyone (their blocks
come only from beyond one per running sequence; no room: a plain decode). `update` appends the tokens the verification kept one at a time, checking
the stop conditions after each (tokens after a stop are dropped), sets
`num_computed_tokens = num_tokens - 1` (the target's own token has no KV yet) and frees the
blocks wholly past the tokens. Rejected drafts' KV lies only past `num_computed_tokens`,
where the prefix cache never looks (it takes only full computed blocks); later steps
overwrite it.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from xllm.engine.block_manager import BlockManager
from xllm.engine.encode_ahead import Encode, EncodeAhead
from xllm.engine.proposer import Proposer
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus
from xllm.engine.speculation import draft_room
from xllm.protocol.stats import LoadStats


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int
    samples: bool
    """This step reaches the end of the sequence's tokens, so it samples the next one."""
    draft_token_ids: list[int] = field(default_factory=list)
    """Speculative drafts verified after the sequence's last token; they are the last
    `len(draft_token_ids)` of the `num_new_tokens` and not (yet) in `token_ids`."""


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)
    """(parent, child) pairs made this step; the child samples from the parent's logits."""
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    """(src, dst) KV block copies to run after the forward pass (forks' partial blocks)."""
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    """(device block, host block) copies to run before the forward pass."""
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    """(host block, device block) copies to run before the forward pass."""
    encodes: list[Encode] = field(default_factory=list)
    """Images of prompts this step does not reach yet, encoded ahead (encode_ahead.py)."""
    max_drafts: int = 0
    """Drafts a decoding sequence could verify this step (0: speculation is off for it)."""
    draft_catch_up_seconds: float = 0.0
    """Filled in by the ModelRunner: time its draft model spent catching up (draft_model.py)."""
    draft_prefill_seconds: float = 0.0
    """Filled in by the ModelRunner: time of its draft model's prefill passes, catch-up and
    mirror of prompt chunks (the price of a catch-up per token, speculation.py)."""
    draft_prefill_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled and not self.swap_out


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        num_host_blocks: int = 0,
        proposer: Proposer | None = None,
    ):
        self.block_manager = block_manager
        self.proposer = proposer
        """Where drafts come from when a step speculates (None: never)."""
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        """Offline sequences preempted with their KV in host memory, oldest first."""
        self.free_host_blocks: list[int] = list(range(num_host_blocks))
        self.num_preemptions = 0
        self.num_swap_outs = 0
        """Sequences preempted by swapping (also counted in `num_preemptions`)."""
        self.num_swapped_out_blocks = 0
        self.num_swapped_in_blocks = 0
        self._max_drafts = 0  # this step's k (see schedule)
        self.encode_ahead: EncodeAhead | None = None
        """Set by the engine for models that take images (None: text, or no budget)."""

    def add(self, seq: Sequence) -> None:
        if seq.mm is not None and self.encode_ahead is not None:
            self.encode_ahead.add(seq)
        self._enqueue(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def load_stats(self, reserved: Collection[Sequence] = ()) -> LoadStats:
        """The queues as heartbeats report them, with `reserved`: the sequences holding
        blocks for a prompt another instance prefills (held by the engine, not queued here).
        A pass over the queues: cheap at heartbeat rate, too slow per step."""
        queued = [*self.waiting, *self.running]
        prefilling = [
            (s.num_tokens - s.num_computed_tokens, s.priority)
            for s in queued
            if s.num_tokens - s.num_computed_tokens > 1
        ]
        return LoadStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            # Work, not footprint: prompt tokens served from the prefix cache cost nothing,
            # as in the cluster scheduler's own count of what it placed since a heartbeat.
            num_tokens_in_flight=sum(s.num_tokens - s.num_cached_tokens for s in queued),
            num_prefill_backlog_tokens=sum(n for n, _ in prefilling),
            num_offline_prefill_backlog_tokens=sum(n for n, p in prefilling if p > 0),
            num_decoding=sum(1 for s in self.running if s.num_computed_tokens >= s.num_tokens - 1),
            num_reserved=len(reserved),
            num_reserved_tokens=sum(s.num_tokens for s in reserved),
        )

    # -- the queues, online ahead of offline ----------------------------------------------

    def _enqueue(self, seq: Sequence, front: bool = False) -> None:
        """Into `waiting`: at the back (or `front`) of its class, online before offline."""
        waiting = self.waiting
        if seq.priority == 0:
            if front:
                waiting.appendleft(seq)
            elif not waiting or waiting[-1].priority == 0:
                waiting.append(seq)
            else:
                waiting.insert(_first_offline(waiting), seq)
        elif front:
            waiting.insert(_first_offline(waiting), seq)
        else:
            waiting.append(seq)

    def _start(self, seq: Sequence) -> None:
        """Into `running`, at the back of its class (preemption takes from the back)."""
        running = self.running
        if seq.priority > 0 or not running or running[-1].priority == 0:
            running.append(seq)
        else:
            running.insert(_first_offline(running), seq)

    # -- schedule -------------------------------------------------------------------------

    def schedule(
        self, num_draft_tokens: int = 0, offline_budget: int | None = None
    ) -> SchedulerOutput:
        """The next step: decodes, prefill chunks (`_schedule_step`), then pending encodes."""
        out = self._schedule_step(num_draft_tokens, offline_budget)
        if self.encode_ahead is not None and out.scheduled:  # the step's third part
            out.encodes = self.encode_ahead.plan(out)
        return out

    def _schedule_step(self, num_draft_tokens: int, offline_budget: int | None) -> SchedulerOutput:
        """The step's decodes and prefill chunks. `num_draft_tokens` > 0: decoding sequences
        may verify up to that many drafts each (module doc). `offline_budget`: the most
        tokens offline work may add to a step that also runs online sequences
        (`offline_token_budget`); None = what the token budget leaves."""
        self._max_drafts = num_draft_tokens if self.proposer is not None else 0
        out = SchedulerOutput(max_drafts=self._max_drafts)
        budget = self.max_num_batched_tokens
        # Online first: running, then waiting; offline after: running, swapped, waiting.
        budget, i = self._continue(out, budget, 0, online_only=True)
        budget = self._admit(out, budget, online_only=True)
        while i < len(self.running) and self.running[i].priority == 0:
            i += 1  # past the online ones just admitted (scheduled already)
        if offline_budget is not None and i > 0:  # online sequences run in this step
            budget = min(budget, offline_budget)
        budget, _ = self._continue(out, budget, i, online_only=False)
        if self.waiting and self.waiting[0].priority == 0:
            return out  # an online request still waits for room: offline work takes none
        if self.swapped and not out.swap_out:
            budget = self._swap_in(out, budget)
        if not self.swapped:
            self._admit(out, budget, online_only=False)
        return out

    def _continue(
        self, out: SchedulerOutput, budget: int, start: int, online_only: bool
    ) -> tuple[int, int]:
        """Schedule running sequences from index `start` (decodes, or their prefill's next
        chunk) while budget lasts; stops at the first offline one if `online_only`.
        Returns the budget left and the index it stopped at."""
        i = start
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if online_only and seq.priority > 0:
                break
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:  # a beam waiting for the rest of its group (beam_search.py)
                i += 1
                continue
            drafts = self._drafts(seq, budget) if num_new == 1 and self._max_drafts else []
            if drafts and not self._allocate_drafts(seq, len(drafts)):
                drafts = []  # no room for the drafts' slots: a plain decode
            if not drafts and not self._allocate_or_preempt(seq, num_new, out):
                break  # `seq` itself was preempted; everything after it already was
            num_new += len(drafts)
            self._schedule(out, seq, num_new, drafts)
            budget -= num_new
            i += 1
        return budget, i

    def _drafts(self, seq: Sequence, budget: int) -> list[int]:
        room = draft_room(seq, self._max_drafts, budget, self.max_model_len)
        assert self.proposer is not None
        return self.proposer.propose(seq, room) if room > 0 else []

    def _allocate_drafts(self, seq: Sequence, num_drafts: int) -> bool:
        """Slots for the last token and the drafts, taking for the drafts only blocks beyond
        one per running sequence: drafts never leave a later decode to preempt someone."""
        bm = self.block_manager
        extra = bm.num_blocks_needed(seq, 1 + num_drafts) - bm.num_blocks_needed(seq, 1)
        if extra and bm.num_free_blocks - extra < len(self.running):
            return False
        return bm.allocate(seq, 1 + num_drafts)

    def _admit(self, out: SchedulerOutput, budget: int, online_only: bool) -> int:
        """Start waiting sequences in order while room allows; an online one that does not
        fit preempts running offline ones until it does. Returns the budget left."""
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if online_only and seq.priority > 0:
                break
            if seq.block_table:  # prefilled remotely: its prompt KV is in its blocks
                cached, num_cached_tokens = [], seq.num_computed_tokens
            else:
                cached = self.block_manager.find_cached_prefix(seq)
                num_cached_tokens = len(cached) * self.block_manager.block_size
            num_new = min(seq.num_tokens - num_cached_tokens, budget)
            extra = self._fork_blocks(seq, num_cached_tokens + num_new)
            fits = len(self.running) + 1 + seq.num_pending_forks <= self.max_num_seqs
            if not (fits and self.block_manager.allocate(seq, num_new, cached, extra)):
                if seq.priority == 0 and self.running and self.running[-1].priority > 0:
                    budget += self._preempt(self.running.pop(), out)
                    continue  # room for the online one may be there now
                break
            self.waiting.popleft()
            if seq.num_output_tokens == 0:  # count prompts, not recomputes
                self.block_manager.record_lookup(seq.num_tokens, num_cached_tokens)
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens = num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self._start(seq)
            self._schedule(out, seq, num_new)
            budget -= num_new
        return budget

    def _swap_in(self, out: SchedulerOutput, budget: int) -> int:
        """Bring swapped sequences back, oldest first, while room allows."""
        bm = self.block_manager
        while self.swapped and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.swapped[0]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            extra = self._fork_blocks(seq, seq.num_computed_tokens + num_new)
            if not bm.allocate(seq, num_new, num_extra_blocks=extra):
                break
            self.swapped.popleft()
            host = seq.host_block_table
            out.swap_in.extend(zip(host, seq.block_table, strict=False))
            self.free_host_blocks.extend(host)
            self.num_swapped_in_blocks += len(host)
            seq.host_block_table = []
            seq.status = SequenceStatus.RUNNING
            self._start(seq)
            self._schedule(out, seq, num_new)
            budget -= num_new
        return budget

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> bool:
        extra = self._fork_blocks(seq, seq.num_computed_tokens + num_new)
        while not self.block_manager.allocate(seq, num_new, num_extra_blocks=extra):
            victim = self.running.pop()
            self._preempt(victim, out)
            if victim is seq:
                return False
        return True

    def _fork_blocks(self, seq: Sequence, computed_after_step: int) -> int:
        """Blocks the forks made when this step completes `seq`'s prompt will need."""
        if seq.num_pending_forks == 0 or computed_after_step < seq.num_tokens:
            return 0
        partial = seq.num_tokens % self.block_manager.block_size != 0
        return seq.num_pending_forks if partial else 0

    def _schedule(
        self, out: SchedulerOutput, seq: Sequence, num_new: int, drafts: list[int] = ()
    ) -> None:
        samples = seq.num_computed_tokens + num_new - len(drafts) == seq.num_tokens
        item = ScheduledSeq(seq, num_new, samples, list(drafts))
        out.scheduled.append(item)
        if item.samples and seq.num_pending_forks:
            for index in range(seq.params.n - seq.num_pending_forks, seq.params.n):
                child = seq.fork(index)
                copy = self.block_manager.fork(seq, child)
                if copy is not None:
                    out.block_copies.append(copy)
                out.forks.append((seq, child))
            seq.num_pending_forks = 0

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> int:
        """Take `seq` (already out of `running`) off the batch: swap its KV out if it is
        offline and the host space has room, else drop its KV to recompute it later.
        Returns the budget it gave back (it may have been scheduled this step already)."""
        given_back = 0
        for i, item in enumerate(out.scheduled):
            if item.seq is seq:  # nothing of this step has run yet: unschedule it
                given_back = item.num_new_tokens
                del out.scheduled[i]
                break
        self.num_preemptions += 1
        num_computed_blocks = -(-seq.num_computed_tokens // self.block_manager.block_size)
        # (Not a beam: one swapped back in with its candidates taken would not sample again,
        # and its group advances only on a sample; recomputed, it samples.)
        swappable = seq.priority > 0 and seq.beam is None
        if swappable and 0 < num_computed_blocks <= len(self.free_host_blocks):
            host = [self.free_host_blocks.pop() for _ in range(num_computed_blocks)]
            out.swap_out.extend(zip(seq.block_table[:num_computed_blocks], host, strict=True))
            seq.host_block_table = host
            self.block_manager.free(seq)  # the copies run before anything can write them
            seq.status = SequenceStatus.SWAPPED
            self.swapped.append(seq)
            self.num_swap_outs += 1
            self.num_swapped_out_blocks += num_computed_blocks
            return given_back
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=True)
        return given_back

    # -- after the step -------------------------------------------------------------------

    def update(
        self,
        out: SchedulerOutput,
        sampled: dict[tuple[str, int], int],
        verified: dict[tuple[str, int], list[int]] | None = None,
    ) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, retire finished sequences.

        `sampled` maps seq_id -> token for every sequence that sampled this step,
        forks included, except those that verified drafts: `verified` maps those to the
        tokens to append (the kept drafts, then the target's token). Returns the sequences
        that sampled, in a stable order.
        """
        sampled_seqs: list[Sequence] = []
        for item in out.scheduled:
            seq = item.seq
            seq.num_computed_tokens += item.num_new_tokens - len(item.draft_token_ids)
            self.block_manager.cache_full_blocks(seq)
            if item.samples:
                sampled_seqs.append(seq)
            if item.draft_token_ids:
                assert verified is not None, "drafts were scheduled but not verified"
                seq.num_draft_tokens += len(item.draft_token_ids)
                seq.num_accepted_draft_tokens += len(verified[seq.seq_id]) - 1
        for parent, siblings in itertools.groupby(out.forks, key=lambda fork: fork[0]):
            children = [child for _, child in siblings]
            for child in children:
                child.num_computed_tokens = parent.num_computed_tokens
            at = self.running.index(parent) + 1
            self.running[at:at] = children
            sampled_seqs.extend(children)
        for seq in sampled_seqs:
            if seq.beam is not None:
                continue  # its group picks its token once all its beams sampled
            if verified and seq.seq_id in verified:
                reason = self._append_verified(seq, verified[seq.seq_id])
            else:
                seq.token_ids.append(sampled[seq.seq_id])
                reason = self.finish_reason(seq)
            if reason is not None:
                self.finish(seq, reason)
            elif seq.prefill_only:
                self.running.remove(seq)
                seq.status = SequenceStatus.HELD  # until its blocks are sent
        return sampled_seqs

    def _append_verified(self, seq: Sequence, tokens: list[int]) -> FinishReason | None:
        """Append a verification's tokens one at a time, up to the first that ends `seq`;
        then the kept drafts count as computed and the blocks past the tokens are freed."""
        for token in tokens:
            seq.token_ids.append(token)
            reason = self.finish_reason(seq)
            if reason is not None:
                return reason  # the rest is dropped; finish() frees every block
        seq.num_computed_tokens = seq.num_tokens - 1
        self.block_manager.cache_full_blocks(seq)
        self.block_manager.free_tail(seq, seq.num_tokens)
        return None

    def finish_reason(self, seq: Sequence) -> FinishReason | None:
        params = seq.params
        token = seq.token_ids[-1]
        if seq.grammar is not None and seq.grammar.is_terminated():
            return FinishReason.STOP  # its grammar took a stop token: nothing may follow
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
        elif seq.status is SequenceStatus.SWAPPED:
            self.swapped.remove(seq)
            self.free_host_blocks.extend(seq.host_block_table)
            seq.host_block_table = []
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def adopt(self, seq: Sequence) -> None:
        """Into `running`: a sequence forked outside the scheduler (a beam, beam_search.py),
        holding its blocks already."""
        seq.status = SequenceStatus.RUNNING
        self._start(seq)

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

    def admit_prefilled(self, seq: Sequence, first_token_id: int | None) -> FinishReason | None:
        """Decode side: the prompt's KV has arrived in `seq`'s reserved blocks and the prefill
        side sampled `first_token_id`. Queue `seq` to decode (first in line: it already
        holds its blocks), or finish it if that token ends it; returns the finish reason.
        `first_token_id` None (beam search, which needs the prompt's logits, not a token):
        the prompt's last token is computed again here, and samples."""
        assert seq.status is SequenceStatus.HELD and seq.num_output_tokens == 0, seq
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.block_manager.cache_full_blocks(seq)
        if first_token_id is None:
            seq.num_computed_tokens -= 1
            seq.status = SequenceStatus.WAITING
            self._enqueue(seq, front=True)
            return None
        seq.token_ids.append(first_token_id)
        reason = self.finish_reason(seq)
        if reason is not None:
            self.finish(seq, reason)
            return reason
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, front=True)
        return None


def offline_token_budget(
    share: float, decode_step_seconds: float, prefill_seconds_per_token: float
) -> int | None:
    """Tokens offline work may add to a step that runs online sequences: `share` of an
    online decode step's time, priced at the measured prefill cost per token. So an offline
    prompt chunk stretches an online request's time per output token (and delays the next
    online arrival's first token) by about that share at most, instead of by a whole chunk
    of the token budget (report §3.1: offline work fills what online latency leaves).
    None = no cap yet: nothing measured."""
    if decode_step_seconds <= 0 or prefill_seconds_per_token <= 0:
        return None
    return int(share * decode_step_seconds / prefill_seconds_per_token)


def _first_offline(queue) -> int:
    """Index of the first offline sequence in `queue` (its length if none)."""
    for i, seq in enumerate(queue):
        if seq.priority > 0:
            return i
    return len(queue)
