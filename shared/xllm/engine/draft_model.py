"""DraftModel: speculative drafts from a smaller model of the same vocabulary.

`--speculative draft --draft-model PATH`. The draft keeps its KV in its own pool tensors,
indexed by the SAME block tables as the target's (a mirror pool: the same block size and
block ids, the draft's own layer count and heads), so the target's block manager, prefix
cache and slot allocation serve both and there is no second block manager. Slots the
scheduler gives a sequence for its last token and its drafts hold the draft's KV of the
same tokens.

Per step that speculates (the adaptive switch on: speculation.py), inside the target's
`ModelRunner.execute`:

  * `mirror`: the draft computes its KV for the step's prefill chunks (the same chunks the
    target prefills, and any positions the draft missed before them);
  * `propose`: for the sequences the scheduler gave d placeholder drafts
    (`DraftProposer`, which only says how many), the draft catches up on the tokens it has
    not seen (usually just the last one), then decodes d tokens greedily, batched across
    those sequences: one forward for the first drafts, then one per further draft.

A step with speculation off runs no draft at all: the chunks it prefills and the tokens it
decodes are caught up on lazily, when speculation turns back on — in a forward of their
own before the first drafts (`catch_up`), whose time `propose` returns, so that the
adaptive switch can tell this one-off cost of switching from the cost of speculating.

Which positions of a sequence hold valid draft KV is tracked per sequence (`DraftState`):
the tokens it fed, checked against `token_ids` when next needed (a rejected draft's KV is
stale past the first mismatch), and dropped when the sequence's blocks were freed (its
block table is then a new list: preemption, swap). Anything not valid is recomputed — a PD
decode instance, which receives only the target's KV, catches the draft up on the prompt at
the first proposal. Greedy drafts are a deterministic function of the tokens, which is what
the rejection sampler assumes (proposer.py); their quality only changes how many are kept.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from xllm.engine.batch_layout import CHUNK, DECODE, VERIFY, Run, lay_out
from xllm.engine.kv_cache import KVCache
from xllm.engine.proposer import Proposer
from xllm.engine.scheduler import ScheduledSeq
from xllm.engine.sequence import Sequence
from xllm.models.attention import PagedAttention
from xllm.models.config import ModelConfig
from xllm.models.registry import load_model

MAX_VERIFY_CATCH_UP = 16
"""Tokens the draft catches up on through the multi-token decode attention; more go
through the prefill path (a verify run's scores are rows x context, per head)."""

PLACEHOLDER = 0
"""The token a `DraftProposer` draft holds until `DraftModel.propose` fills it in."""


class DraftProposer(Proposer):
    """The scheduler's side of the draft model: as many drafts as there is room for, filled
    in by `DraftModel.propose` once the step's slots are allocated."""

    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        return [PLACEHOLDER] * max(0, max_tokens)


@dataclass
class DraftState:
    """Where one sequence's draft KV is valid."""

    block_table: list[int]
    """The sequence's block table list when it was written (a freed sequence gets a new one)."""
    num_valid: int
    """Positions [0, num_valid) hold the draft's KV of `token_ids[:num_valid]`."""
    fed: list[int] = field(default_factory=list)
    """Tokens fed at positions num_valid.. (drafts): valid as far as `token_ids` agrees."""


class DraftModel:
    def __init__(
        self,
        model_dir: str | Path,
        target: ModelConfig,
        dtype: torch.dtype,
        device: torch.device,
        num_blocks: int,
        block_size: int,
    ):
        self.config = mc = ModelConfig.from_dir(model_dir)
        if mc.vocab_size != target.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({mc.vocab_size}) is not the target's "
                f"({target.vocab_size}): --draft-model needs a model of the same tokenizer"
            )
        self.device = device
        self.block_size = block_size
        self.model = load_model(model_dir, mc, dtype, device)
        self.kv_cache = KVCache(
            mc.num_hidden_layers,
            num_blocks,
            block_size,
            mc.num_key_value_heads,
            mc.head_dim,
            dtype,
            device,
        )
        layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        for index, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache.layer(index)
        self._states: weakref.WeakKeyDictionary[Sequence, DraftState] = weakref.WeakKeyDictionary()
        self._prefill_seconds = 0.0  # of the prefill passes since the last take_prefill
        self._prefill_tokens = 0

    @staticmethod
    def bytes_per_block(model_dir: str | Path, block_size: int, dtype: torch.dtype) -> int:
        mc = ModelConfig.from_dir(model_dir)
        return KVCache.bytes_per_block(
            mc.num_hidden_layers, block_size, mc.num_key_value_heads, mc.head_dim, dtype
        )

    def num_valid(self, seq: Sequence) -> int:
        """Leading positions of `seq` whose draft KV is that of its tokens."""
        state = self._states.get(seq)
        if state is None or state.block_table is not seq.block_table:
            return 0
        valid, tokens = state.num_valid, seq.token_ids
        for token in state.fed:
            if valid >= len(tokens) or tokens[valid] != token:
                break
            valid += 1
        return valid

    def mirror(self, chunks: list[ScheduledSeq]) -> None:
        """The draft's KV for this step's prefill chunks (and whatever it missed before them);
        prefill-only sequences are skipped: their decode runs elsewhere."""
        runs: list[Run] = []
        for item in chunks:
            seq = item.seq
            if seq.prefill_only:
                continue
            end = seq.num_computed_tokens + item.num_new_tokens
            start = min(self.num_valid(seq), seq.num_computed_tokens)
            runs.append(Run(seq.block_table, start, seq.token_ids[start:end], CHUNK))
            self._states[seq] = DraftState(seq.block_table, end)
        self._prefill(runs)

    def propose(self, items: list[ScheduledSeq]) -> float:
        """Fill in the drafts of `items` (each holds d placeholders): d greedy tokens each.
        Returns the seconds spent catching up (`catch_up`)."""
        if not items:
            return 0.0
        catch_up_seconds = self.catch_up([item.seq for item in items])
        # First pass: the tokens the draft has not seen, up to the last one (after a catch-up,
        # the last one; else the target's token, after any drafts it kept).
        firsts = []
        for item in items:
            seq = item.seq
            start = min(self.num_valid(seq), seq.num_tokens - 1)
            tokens = seq.token_ids[start:]
            kind = DECODE if len(tokens) == 1 and start > 0 else VERIFY if start > 0 else CHUNK
            firsts.append(Run(seq.block_table, start, tokens, kind))
        order = sorted(
            range(len(items)), key=lambda i: (firsts[i].kind != DECODE, firsts[i].kind == CHUNK)
        )
        tokens = self._next_tokens([firsts[i] for i in order])
        drafts: list[list[int]] = [[] for _ in items]
        for i, token in zip(order, tokens, strict=True):
            drafts[i].append(token)
        # Then one decode pass per further draft, for the sequences that want it.
        for depth in range(1, max(len(item.draft_token_ids) for item in items)):
            more = [i for i, item in enumerate(items) if len(item.draft_token_ids) > depth]
            runs = [
                Run(
                    items[i].seq.block_table,
                    items[i].seq.num_tokens - 1 + depth,
                    [drafts[i][-1]],
                    DECODE,
                )
                for i in more
            ]
            for i, token in zip(more, self._next_tokens(runs), strict=True):
                drafts[i].append(token)
        for item, draft in zip(items, drafts, strict=True):
            item.draft_token_ids[:] = draft
            seq = item.seq
            # Fed: the tokens up to the last one, then every draft but the last.
            self._states[seq] = DraftState(seq.block_table, seq.num_tokens, draft[:-1])
        return catch_up_seconds

    def catch_up(self, seqs: list[Sequence]) -> float:
        """The draft's KV of the tokens before the last of each of `seqs` that lags by more
        than MAX_VERIFY_CATCH_UP tokens (after steps without speculation, or a PD decode
        instance's prompt), in one prefill forward; its seconds (0 if none lags)."""
        runs: list[Run] = []
        for seq in seqs:
            start, end = self.num_valid(seq), seq.num_tokens - 1
            if start == 0 or end - start > MAX_VERIFY_CATCH_UP:
                runs.append(Run(seq.block_table, start, seq.token_ids[start:end], CHUNK))
                self._states[seq] = DraftState(seq.block_table, end)
        return self._prefill(runs)

    def _prefill(self, runs: list[Run]) -> float:
        """The draft's KV of `runs` (chunks) in one forward; its seconds (0 if no run)."""
        if not runs:
            return 0.0
        started = time.perf_counter()
        input_ids, positions, meta = lay_out(runs, self.block_size, self.device)
        self.model(input_ids, positions, meta)
        seconds = time.perf_counter() - started
        self._prefill_seconds += seconds
        self._prefill_tokens += sum(len(run.token_ids) for run in runs)
        return seconds

    def take_prefill(self) -> tuple[float, int]:
        """Seconds and tokens of the prefill passes (mirror, catch-up) since the last call."""
        taken = self._prefill_seconds, self._prefill_tokens
        self._prefill_seconds, self._prefill_tokens = 0.0, 0
        return taken

    def _next_tokens(self, runs: list[Run]) -> list[int]:
        """The draft's greedy token after each run (runs ordered as `lay_out` wants)."""
        input_ids, positions, meta = lay_out(runs, self.block_size, self.device)
        hidden = self.model(input_ids, positions, meta)  # [N, hidden]
        ends = torch.tensor([len(r.token_ids) for r in runs]).cumsum(0) - 1
        # lay_out puts decodes first, then the runs in order: row ends follow the runs.
        logits = self.model.compute_logits(hidden[ends.to(self.device)])  # [B, V]
        return logits.argmax(-1).tolist()
