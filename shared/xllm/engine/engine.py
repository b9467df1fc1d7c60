"""Engine: requests in, token deltas out; `step()` is schedule -> run -> update.

The engine is synchronous and single-threaded on purpose: the instance program drives
`step()` from its own thread and feeds requests and aborts in between steps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from xllm.config import EngineConfig
from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_cache import KVCache
from xllm.engine.model_runner import ModelRunner
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import Scheduler
from xllm.engine.sequence import FinishReason, Logprob, Sequence, SequenceStatus
from xllm.models.config import ModelConfig, parse_dtype
from xllm.platform import default_dtype, select_device

log = logging.getLogger(__name__)


@dataclass
class SequenceOutput:
    """What one step produced for one completion: the new tokens since the last delta."""

    request_id: str
    index: int
    token_ids: list[int]
    logprobs: list[Logprob] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    prefilled: bool = False
    """A prefill-only request's first token: its prompt KV is held until `release_prefilled`."""


@dataclass
class Reservation:
    """Blocks a decode instance holds for a request another instance prefills."""

    block_ids: list[int]
    """The request's whole block table here, in prompt order."""
    num_cached_tokens: int
    """Prompt tokens already in this instance's prefix cache (whole blocks)."""
    fill_block_ids: list[int]
    """The blocks the prefill side must write: `block_ids` after the cached ones."""


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks_used: int
    num_blocks_free: int
    prefix_queried_tokens: int
    prefix_hit_tokens: int
    num_preemptions: int
    num_steps: int


class Engine:
    def __init__(self, config: EngineConfig):
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.config = config
        self.model_config = mc = ModelConfig.from_dir(config.model)
        self.device = select_device(config.device)
        self.dtype = (
            default_dtype(self.device, mc.torch_dtype)
            if config.dtype == "auto"
            else parse_dtype(config.dtype)
        )
        num_blocks = self._num_blocks()
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        if num_blocks * config.block_size < self.max_model_len:
            self.max_model_len = num_blocks * config.block_size
            log.warning(
                "KV pool holds only %d tokens: max_model_len lowered to that", self.max_model_len
            )
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            self.block_manager,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            mc.eos_token_ids,
        )
        torch.manual_seed(config.seed)
        self.runner = ModelRunner(config, mc, self.dtype, self.device, num_blocks)
        self.sequences: dict[str, list[Sequence]] = {}
        self.num_steps = 0

    def _num_blocks(self) -> int:
        if self.config.num_kv_blocks > 0:
            return self.config.num_kv_blocks
        mc = self.model_config
        per_block = KVCache.bytes_per_block(
            mc.num_hidden_layers,
            self.config.block_size,
            mc.num_key_value_heads,
            mc.head_dim,
            self.dtype,
        )
        return max(1, int(self.config.kv_cache_gb * 2**30) // per_block)

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> None:
        """Queue a request; raises ValueError (and changes nothing) when it is invalid.

        `prefill_only` (prefill role): stop after the first token, whose delta says
        `prefilled`, and hold the prompt's blocks until `release_prefilled`.
        """
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params, disaggregated=prefill_only)
        seq = Sequence(request_id, prompt_token_ids, params, prefill_only=prefill_only)
        self.sequences[request_id] = [seq]
        self.scheduler.add(seq)

    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, disaggregated: bool = False
    ) -> None:
        vocab = self.model_config.vocab_size
        params.validate(vocab)
        if disaggregated and params.n != 1:
            raise ValueError("n > 1 is not supported with prefill/decode disaggregation")
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, and at least one must be left to generate"
            )
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if unknown or done."""
        seqs = self.sequences.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        return True

    # -- PD disaggregation ----------------------------------------------------------------

    def reserve_remote_prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams
    ) -> Reservation | None:
        """Decode side: hold blocks for a prompt another instance prefills; None if the pool
        is short. Raises ValueError when the request is invalid."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.validate(prompt_token_ids, params, disaggregated=True)
        seq = Sequence(request_id, prompt_token_ids, params)
        if not self.scheduler.reserve(seq):
            return None
        self.sequences[request_id] = [seq]
        num_cached_blocks = seq.num_cached_tokens // self.config.block_size
        return Reservation(
            list(seq.block_table), seq.num_cached_tokens, seq.block_table[num_cached_blocks:]
        )

    def commit_remote_prefill(
        self, request_id: str, first_token_id: int, first_logprob: Logprob | None = None
    ) -> FinishReason | None:
        """Decode side: the reserved blocks now hold the prompt's KV; decode from the first
        token (already streamed by the prefill side). Returns the finish reason if that
        token ends the request (its blocks are then freed)."""
        seq = self._held(request_id)
        if first_logprob is not None:
            seq.logprobs.append(first_logprob)
        reason = self.scheduler.admit_prefilled(seq, first_token_id)
        if reason is not None:
            self._forget_if_done(request_id)
        return reason

    def prefilled_block_ids(self, request_id: str) -> list[int]:
        """Prefill side: the blocks holding a prefilled request's prompt KV, in prompt order
        (the last one partial unless the prompt fills it)."""
        return list(self._held(request_id).block_table)

    def release_prefilled(self, request_id: str) -> None:
        """Prefill side: the KV was sent (or is no longer wanted); free the blocks."""
        self.scheduler.finish(self._held(request_id), None)
        del self.sequences[request_id]

    def _held(self, request_id: str) -> Sequence:
        seqs = self.sequences.get(request_id)
        if not seqs or seqs[0].status is not SequenceStatus.HELD:
            raise KeyError(f"request {request_id!r} holds no blocks here")
        return seqs[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        out = self.scheduler.schedule()
        if out.is_empty:
            return []
        seqs, sampled = self.runner.execute(out)
        for seq, logprob in zip(seqs, sampled.logprobs, strict=True):
            if logprob is not None:
                seq.logprobs.append(logprob)
        tokens = {seq.seq_id: tok for seq, tok in zip(seqs, sampled.token_ids, strict=True)}
        for _parent, child in out.forks:
            self.sequences[child.request_id].append(child)
        self.num_steps += 1
        return [self._delta(seq) for seq in self.scheduler.update(out, tokens)]

    def _delta(self, seq: Sequence) -> SequenceOutput:
        if seq.is_finished:
            self._forget_if_done(seq.request_id)
        return SequenceOutput(
            request_id=seq.request_id,
            index=seq.index,
            token_ids=[seq.token_ids[-1]],
            logprobs=[seq.logprobs[-1]] if seq.params.logprobs is not None else None,
            finish_reason=seq.finish_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
            prefilled=seq.status is SequenceStatus.HELD,
        )

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.sequences.get(request_id)
        if seqs and all(s.is_finished for s in seqs) and len(seqs) == seqs[0].params.n:
            del self.sequences[request_id]

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks_used=bm.num_used_blocks,
            num_blocks_free=bm.num_free_blocks,
            prefix_queried_tokens=bm.stats.queried_tokens,
            prefix_hit_tokens=bm.stats.hit_tokens,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
        )
