"""Sequence: one completion's tokens and how far the engine has computed them.

Token accounting (vLLM v1 style): `token_ids` holds the prompt followed by the generated
tokens; `num_computed_tokens` of them have KV in the cache. A step schedules some of the
rest; prefill, chunked prefill, decode and recompute after preemption are all "compute
the next `num_tokens - num_computed_tokens` tokens", never separate modes.
"""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from xllm.engine.prefix_hash import extend_block_hashes
from xllm.protocol.types import Logprob, SamplingParams

if TYPE_CHECKING:
    import torch
    from xgrammar import GrammarMatcher

    from xllm.engine.beam_search import BeamGroup
    from xllm.engine.multimodal import MultimodalPrompt


PLACEHOLDER = -1
"""A token not sampled yet: async scheduling (async_step.py) appends one for the token a
running step samples, so the next step can be scheduled before it ends."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    HELD = "held"
    """Holds its blocks outside the queues (PD disaggregation): reserved for a remote
    prefill on the decode side, or prefilled and awaiting transfer on the prefill side."""
    SWAPPED = "swapped"
    """Preempted keeping its KV: its computed blocks were copied to host memory
    (`host_block_table`) and its device blocks freed, until room returns."""
    FINISHED = "finished"


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS or a stop token
    LENGTH = "length"  # max_tokens or the context length
    ABORT = "abort"  # client or operator abort


class Sequence:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        index: int = 0,
        arrival_time: float | None = None,
        prefill_only: bool = False,
        priority: int = 0,
    ):
        self.request_id = request_id
        self.priority = priority
        """0 = online; > 0 = offline: scheduled after online work, preempted first, and
        preempted by swapping its KV out rather than dropping it."""
        self.index = index
        """Which of the request's `n` completions this is."""
        self.params = params
        self.prefill_only = prefill_only
        """Stop after the prompt and the first token, and hold the blocks (prefill role)."""
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        """Prompt tokens served from the prefix cache at admission (for usage and metrics)."""
        self.block_table: list[int] = []
        self.num_published_blocks = 0
        """Leading blocks of `block_table` already in the prefix cache: `cache_full_blocks`
        starts after them (reset when the blocks are freed)."""
        self.host_block_table: list[int] = []
        """While SWAPPED: the host swap blocks holding its computed KV, in order."""
        self.block_hashes: list[int] = []
        """Chained hashes of the full blocks of `token_ids`, extended lazily."""
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.logprobs: list[Logprob] = []
        self.num_pending_forks = params.n - 1 if index == 0 and not params.use_beam_search else 0
        """Siblings still to be forked off this sequence once its prompt is computed."""
        self.num_draft_tokens = 0
        """Speculative draft tokens verified for this sequence so far."""
        self.num_accepted_draft_tokens = 0
        """Of those, the ones the target model accepted."""
        self.grammar: GrammarMatcher | None = None
        """With `params.structured`: the grammar's matcher, past every output token (the
        engine sets it, engine/grammar.py). Terminated = the completion is over."""
        self.beam: BeamGroup | None = None
        """A beam of a beam search: its group picks its tokens (engine/beam_search.py)."""
        self.mm: MultimodalPrompt | None = None
        """A prompt with images: their spans, embeddings and M-RoPE positions
        (engine/multimodal.py); None for text."""

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id}#{self.index}, {self.status.value}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )

    def next_token_generator(self, offset: int = 0) -> torch.Generator | None:
        """For a seeded sequence, the generator of its next token's noise, seeded by (seed,
        completion index, position of the token) instead of carried from step to step: the
        same tokens then come out wherever the sequence continues — the decode instance
        after a PD handoff, or another instance resuming it with the tokens streamed so far
        appended to the prompt. `offset`: the token that many positions further (the rows
        of a speculative verification)."""
        if self.params.seed is None:
            return None
        import torch  # here: the scheduler and the simulator use sequences without torch

        key = (self.params.seed * 1_000_003 + self.index) * 1_000_033 + self.num_tokens + offset
        return torch.Generator().manual_seed(key % 2**63)

    @property
    def seq_id(self) -> tuple[str, int]:
        return (self.request_id, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def full_block_hashes(self, block_size: int) -> list[int]:
        tokens = self.token_ids
        if tokens and tokens[-1] == PLACEHOLDER:  # no hash may cover a token not known yet
            tokens = tokens[:-1]
        tokens = tokens if self.mm is None else self.mm.hash_token_ids(tokens)
        return extend_block_hashes(self.block_hashes, tokens, block_size)

    def fork(self, index: int) -> Sequence:
        """A sibling with the same prompt and (shared) computed KV, before any output."""
        assert self.num_output_tokens == 0, "forks happen when the prompt is computed"
        child = Sequence(
            self.request_id, self.token_ids, self.params, index, self.arrival_time,
            priority=self.priority,
        )  # fmt: skip
        child.block_hashes = list(self.block_hashes)
        child.mm = self.mm
        child.grammar = self.grammar.fork() if self.grammar is not None else None
        child.num_cached_tokens = self.num_cached_tokens
        child.status = SequenceStatus.RUNNING
        return child
