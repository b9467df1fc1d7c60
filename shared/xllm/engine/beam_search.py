"""Beam search as an engine feature: a request's beams are live sequences of the batch.

A beam search request (`SamplingParams.use_beam_search`) starts as one sequence, its
prompt. Every sequence of it is a beam of one `BeamGroup`; beams decode in the ordinary
continuous batch, next to whatever else runs. Each step that a beam samples, the sampler
takes its row's top candidates (`beam_candidates`: one log-softmax and one top-k over all
the batch's beam rows, with the item-trie and min_tokens masks applied to the rows that
have them). Once every live beam of a group has its candidates, the group advances
(`BeamGroup.advance`): one top-k over cumulative logprob + candidate logprob picks the
next beams, exactly as transformers' `_beam_search` (5.x) does:

  * it keeps the best K = max(2, 1 + #stop tokens) * width continuations; those that end
    (a stop token, max_tokens, or a completed item with a trie) and rank in the first
    `width` become finished hypotheses, scored cumulative logprob / length **
    length_penalty; the best `width` non-ending ones are the next beams;
  * it stops when no continuation remains, when `early_stopping` is True and `width`
    hypotheses finished, or when the best running beam can no longer beat the worst
    finished hypothesis (at its current length, or at max_tokens for "never" with a
    positive length penalty);
  * it returns the best `n` hypotheses, with their cumulative logprobs.

The KV follows the beams through the block manager's ref counts: a beam chosen once
continues in its own sequence; chosen again, it is forked (full blocks shared, the partial
last block copied, `BlockManager.fork`); a beam not chosen is finished and its blocks
return to the pool. So the prompt's blocks are shared by every beam, and blocks are held
only while some beam still uses them. NOTE: a fork needs a free block for its partial
block copy; when the pool has none, that continuation is dropped (the group keeps fewer
beams for the step) rather than preempting other requests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from xllm.engine.item_trie import ROOT, ItemTrie
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus

if TYPE_CHECKING:
    from xllm.engine.scheduler import Scheduler

NEG_INF = float("-inf")


@dataclass
class BeamResult:
    """A finished hypothesis."""

    token_ids: list[int]
    """Its output tokens (the stop token included, as for sampled completions)."""
    cumulative_logprob: float
    score: float
    """cumulative_logprob / len(token_ids) ** length_penalty: what ranks hypotheses."""
    finish_reason: FinishReason


@dataclass
class BeamCandidates:
    """One step's candidates of every beam that sampled: row r belongs to `seqs[r]`."""

    seqs: list[Sequence]
    logprobs: torch.Tensor
    """[R, k] the best next-token logprobs of each beam, best first (-inf: not allowed)."""
    token_ids: torch.Tensor
    """[R, k] their tokens."""


def beam_candidates(logits: torch.Tensor, seqs: list[Sequence]) -> BeamCandidates | None:
    """The candidates of the beam rows of a step's logits [R, V] (None if it has none)."""
    rows = [row for row, seq in enumerate(seqs) if seq.beam is not None]
    if not rows:
        return None
    beams = [seqs[row] for row in rows]
    logprobs = constrain(torch.log_softmax(logits[rows].float(), dim=-1), beams)
    k = min(max(seq.beam.num_candidates for seq in beams), logprobs.shape[-1])
    values, token_ids = logprobs.topk(k, dim=-1)
    return BeamCandidates(beams, values, token_ids)


def constrain(logprobs: torch.Tensor, beams: list[Sequence]) -> torch.Tensor:
    """Mask (to -inf) what a beam may not take next: tokens outside its item trie, stop
    tokens before min_tokens. Rows without a constraint are untouched."""
    trie_rows = [row for row, seq in enumerate(beams) if seq.beam.trie is not None]
    early = [row for row, seq in enumerate(beams) if seq.num_output_tokens < seq.params.min_tokens]
    if not trie_rows and not early:
        return logprobs
    keep = torch.ones_like(logprobs, dtype=torch.bool)
    if trie_rows:
        allowed = [beams[row].beam.allowed_tokens(beams[row]) for row in trie_rows]
        keep[trie_rows] = False
        counts = torch.tensor([len(a) for a in allowed])
        keep[torch.repeat_interleave(torch.tensor(trie_rows), counts), torch.cat(allowed)] = True
    for row in early:
        keep[row, list(beams[row].beam.stop_token_ids)] = False
    return logprobs.masked_fill(~keep, NEG_INF)


def ready_groups(candidates: BeamCandidates) -> list[BeamGroup]:
    """Hand each beam its candidates; returns the groups all of whose beams now have them."""
    groups: dict[int, BeamGroup] = {}
    for row, seq in enumerate(candidates.seqs):
        group = seq.beam
        k = group.num_candidates
        group.pending[seq.index] = (candidates.logprobs[row, :k], candidates.token_ids[row, :k])
        groups[id(group)] = group
    return [group for group in groups.values() if group.ready()]


class BeamGroup:
    def __init__(
        self,
        seq: Sequence,
        max_model_len: int,
        eos_token_ids: tuple[int, ...],
        trie: ItemTrie | None = None,
    ):
        params = self.params = seq.params
        self.request_id = seq.request_id
        self.width = params.num_beams
        eos = () if params.ignore_eos else eos_token_ids
        self.stop_token_ids = tuple(dict.fromkeys((*eos, *params.stop_token_ids)))
        self.num_candidates = max(2, 1 + len(self.stop_token_ids)) * self.width
        self.max_tokens = min(params.max_tokens, max_model_len - seq.num_prompt_tokens)
        self.trie = trie
        self.beams: list[Sequence] = [seq]
        """The live beams, best first; the engine's list of the request's sequences."""
        self.scores = torch.zeros(1)
        """Cumulative logprob of each live beam (float32, as transformers keeps them)."""
        self.nodes: dict[int, int] = {seq.index: ROOT}
        """Beam (sequence index) -> its trie node."""
        self.pending: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        """Beam (sequence index) -> its candidates (logprobs, tokens) for the next advance."""
        self.finished: list[BeamResult] = []
        """The best `width` finished hypotheses so far, best first."""
        self.done = False
        self._next_index = seq.index + 1
        seq.beam = self

    def allowed_tokens(self, seq: Sequence) -> torch.Tensor:
        assert self.trie is not None
        last = seq.num_output_tokens + 1 >= self.max_tokens
        return self.trie.allowed(self.nodes[seq.index], last, self.stop_token_ids)

    def ready(self) -> bool:
        return len(self.pending) == len(self.beams) and all(
            seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens == seq.num_tokens
            for seq in self.beams
        )

    def results(self) -> list[BeamResult]:
        return self.finished[: self.params.n]

    def advance(self, scheduler: Scheduler) -> list[tuple[int, int]]:
        """Pick the next beams from the pending candidates (module docstring); returns the
        KV block copies the forks need, to run before the next forward pass. When the
        search is over, every beam is finished and `done` is set."""
        beams = self.beams
        logprobs = torch.stack([self.pending[seq.index][0] for seq in beams])  # [B, k]
        token_ids = torch.stack([self.pending[seq.index][1] for seq in beams])
        self.pending.clear()
        total = (self.scores[:, None] + logprobs).flatten()
        top, flat = total.topk(min(self.num_candidates, total.numel()))
        length = beams[0].num_output_tokens + 1  # beams advance together: one length
        penalized = (top / length**self.params.length_penalty).tolist()
        parents = (flat // logprobs.shape[1]).tolist()
        tokens = token_ids.flatten()[flat].tolist()
        at_max = length >= self.max_tokens
        running: list[tuple[int, int, float, int]] = []  # (parent, token, score, trie node)
        ended: list[BeamResult] = []
        for rank, (parent, token, score) in enumerate(
            zip(parents, tokens, top.tolist(), strict=True)
        ):
            if score == NEG_INF:
                break  # sorted: only masked candidates follow
            node = ROOT
            stop = token in self.stop_token_ids
            complete = False  # an item with nothing after it: ends as if at max_tokens
            if self.trie is not None and not stop:
                node = self.trie.next_node(self.nodes[beams[parent].index], token)
                complete = self.trie.is_leaf(node)
            if stop or complete or at_max:
                if rank < self.width:
                    # "stop" means a stop token ends the output (the gateway drops it from
                    # the text); a completed item ends it like max_tokens: "length".
                    reason = FinishReason.STOP if stop else FinishReason.LENGTH
                    output = [*beams[parent].output_token_ids, token]
                    ended.append(BeamResult(output, score, penalized[rank], reason))
            elif len(running) < self.width:
                running.append((parent, token, score, node))
        self.finished = sorted(self.finished + ended, key=lambda r: -r.score)[: self.width]
        if not running or self._cannot_improve(running[0][2], length):
            self._finish(scheduler)
            return []
        return self._continue(scheduler, running)

    def _cannot_improve(self, best_running: float, length: int) -> bool:
        """transformers' stopping rule: early_stopping True stops once `width` hypotheses
        finished; otherwise once the best running beam's score at its best hypothetical
        length cannot beat the worst finished hypothesis."""
        if len(self.finished) < self.width:
            return False
        if self.params.early_stopping is True:
            return True
        penalty = self.params.length_penalty
        if self.params.early_stopping == "never" and penalty > 0.0:
            length = self.max_tokens
        best = (torch.tensor(best_running) / length**penalty).item()
        return not best > self.finished[-1].score

    def _continue(
        self, scheduler: Scheduler, running: list[tuple[int, int, float, int]]
    ) -> list[tuple[int, int]]:
        old = self.beams
        chosen = {parent for parent, *_ in running}
        for i, seq in enumerate(old):
            if i not in chosen:  # dropped: its blocks go back (shared ones stay held)
                scheduler.finish(seq, None)
        copies: list[tuple[int, int]] = []
        continued: set[int] = set()
        beams: list[tuple[Sequence, int, float, int]] = []
        for parent, token, score, node in running:  # forks first: they copy the parent
            if parent in continued:
                child = self._fork(old[parent], scheduler, copies)
                if child is None:
                    continue  # no block for its partial block copy (module docstring)
            else:
                continued.add(parent)
                child = old[parent]
            beams.append((child, token, score, node))
        for seq, token, _, _ in beams:
            seq.token_ids.append(token)
        self.beams[:] = [seq for seq, *_ in beams]
        self.scores = torch.tensor([score for _, _, score, _ in beams])
        self.nodes = {seq.index: node for seq, _, _, node in beams}
        return copies

    def _fork(
        self, parent: Sequence, scheduler: Scheduler, copies: list[tuple[int, int]]
    ) -> Sequence | None:
        bm = scheduler.block_manager
        if parent.num_tokens % bm.block_size and bm.num_free_blocks == 0:
            return None
        child = Sequence(
            parent.request_id, parent.token_ids, parent.params, self._next_index,
            parent.arrival_time, priority=parent.priority,
        )  # fmt: skip
        self._next_index += 1
        child.num_prompt_tokens = parent.num_prompt_tokens
        child.num_cached_tokens = parent.num_cached_tokens
        child.block_hashes = list(parent.block_hashes)
        child.beam = self
        copy = bm.fork(parent, child)
        if copy is not None:
            copies.append(copy)
        child.num_computed_tokens = parent.num_computed_tokens
        scheduler.adopt(child)
        return child

    def _finish(self, scheduler: Scheduler) -> None:
        for seq in self.beams:
            scheduler.finish(seq, None)
        self.beams.clear()
        self.done = True
