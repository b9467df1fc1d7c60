"""Engine: requests in, token deltas out; `step()` is schedule -> run -> update.

The instance program drives `step()` from its own thread and feeds requests and aborts in
between steps. With --async-scheduling the next step is scheduled while the forward pass
runs on a thread of its own (async_step.py); otherwise a step is synchronous.

Beam search requests run as groups of live sequences in the same batch (beam_search.py):
the sampler takes their candidates, and after `Scheduler.update` each group whose beams
all sampled picks its next beams; it reports once, with its best beams whole, at the end.

With `--speculative`, each step first asks `AdaptiveSpeculation` how many drafts decoding
sequences may verify (0 when it does not pay at this batch size: the plain step runs, see
speculation.py); a delta then carries every token a verification kept.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING

import torch

from xllm.config import EngineConfig
from xllm.engine.beam_search import BeamCandidates, BeamGroup, ready_groups
from xllm.engine.block_manager import BlockManager
from xllm.engine.encode_ahead import EncodeAhead
from xllm.engine.expert_balancer import ExpertBalancer
from xllm.engine.item_trie import ItemTrie
from xllm.engine.kv_cache import pool_sizes
from xllm.engine.model_runner import ModelRunner
from xllm.engine.multimodal import ImageInput, MultimodalPrompt, build_prompt
from xllm.engine.outputs import SequenceOutput, beam_output, sequence_delta, step_shape
from xllm.engine.proposer import make_proposer
from xllm.engine.sampler import SamplerOutput
from xllm.engine.scheduler import Scheduler, SchedulerOutput, offline_token_budget
from xllm.engine.sequence import FinishReason, Sequence, SequenceStatus
from xllm.engine.speculation import AdaptiveSpeculation, SpeculativeStep
from xllm.engine.step_stats import record_first_token, record_scheduler, record_step
from xllm.engine.swap import SwapSpace
from xllm.image_processor import ImageProcessorConfig
from xllm.models.config import ModelConfig, parse_dtype
from xllm.ops import use_native_kernels
from xllm.platform import default_dtype, select_device
from xllm.protocol.errors import ErrorCode, RequestRejected
from xllm.protocol.stats import (
    ExpertStats,
    KvTierStats,
    LoadStats,
    PreemptionStats,
    SpeculationStats,
    StepStats,
)
from xllm.protocol.types import Logprob, SamplingParams

if TYPE_CHECKING:
    from xgrammar import GrammarMatcher

    from xllm.engine.async_step import AsyncSteps
    from xllm.engine.grammar import GrammarCache
    from xllm.engine.kv_tiers import KvTiers

log = logging.getLogger(__name__)


@dataclass
class Reservation:
    """Blocks a decode instance holds for a request another instance prefills."""

    block_ids: list[int]
    """The request's whole block table here, in prompt order."""
    num_cached_tokens: int
    """Prompt tokens already in this instance's prefix cache (whole blocks)."""
    fill_block_ids: list[int]
    """The blocks the prefill side must write: `block_ids` after the cached ones."""


class Engine:
    def __init__(self, config: EngineConfig):
        config.validate()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        use_native_kernels(config.native_kernels)
        self.config = config
        self.model_config = mc = ModelConfig.from_dir(config.model)
        self.device = select_device(config.device)
        self.dtype = (
            default_dtype(self.device, mc.torch_dtype)
            if config.dtype == "auto"
            else parse_dtype(config.dtype)
        )
        num_blocks, num_host_blocks = pool_sizes(config, mc, self.dtype)
        self.max_model_len = min(
            config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings
        )
        if config.draft_model:  # the draft must reach every position the target does
            draft_len = ModelConfig.from_dir(config.draft_model).max_position_embeddings
            if draft_len < self.max_model_len:
                self.max_model_len = draft_len
                log.warning(
                    "the draft model reaches %d positions: max_model_len lowered", draft_len
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
            num_host_blocks=num_host_blocks,
            proposer=make_proposer(config),
        )
        self.speculation: AdaptiveSpeculation | None = None
        if config.speculative:
            self.speculation = AdaptiveSpeculation(
                config.num_speculative_tokens, config.speculative_adaptive
            )
        torch.manual_seed(config.seed)
        self.overlap: AsyncSteps | None = None
        """--async-scheduling's stepper (async_step.py); None: every step synchronous."""
        if config.async_scheduling:
            from xllm.engine.async_step import AsyncSteps

            # Not with drafts (they read the tokens ahead) or tiers (they copy blocks
            # between steps): then every step is synchronous, on the forward thread.
            self.overlap = AsyncSteps(overlaps=not config.speculative and not config.host_kv_gb)
        load = partial(ModelRunner, config, mc, self.dtype, self.device, num_blocks)
        self.runner = self.overlap.on_forward_thread(load) if self.overlap else load()
        self.swap_space = SwapSpace(self.runner.kv_cache, num_host_blocks)
        self.tiers: KvTiers | None = None
        if config.host_kv_gb > 0:
            from xllm.engine.kv_tier_setup import make_tiers

            self.tiers = make_tiers(config, self.runner.kv_cache, self.block_manager)
        self.image_processor: ImageProcessorConfig | None = None
        """How to turn an image into the vision tower's input (models that take images)."""
        if self.runner.multimodal:
            self.image_processor = ImageProcessorConfig.from_dir(config.model)
            if config.max_encode_batch:
                self.scheduler.encode_ahead = EncodeAhead(
                    config.max_encode_batch, config.max_encode_tokens
                )
        self.experts = ExpertBalancer.for_model(self.runner.model, config)
        """MoE models' expert placement and load (None for dense models)."""
        self.sequences: dict[str, list[Sequence]] = {}
        self.num_draft_tokens = 0
        """Cumulative speculative drafts verified, and kept (over every sequence)."""
        self.num_accepted_draft_tokens = 0
        self.step_stats = StepStats()
        """Counted in place by every step; the heartbeat sends a copy."""
        self.decode_step_seconds = 0.0
        """Exponentially weighted wall time of the recent plain decode steps (no prompt
        tokens, no drafts): the basis of `offline_token_budget`."""
        self.grammars: GrammarCache | None = None
        """Compiled grammars of structured-output requests; made with the first one."""
        self.item_tries = {
            name: ItemTrie.from_file(path) for name, path in config.item_trie_paths().items()
        }
        """Beam search's item tries registered by name (--item-trie)."""

    # -- requests -------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
        priority: int = 0,
        images: list[ImageInput] | None = None,
    ) -> None:
        """Queue a request; raises ValueError (and changes nothing) when it is invalid —
        `RequestRejected` with its code where the code is not plain INVALID_REQUEST.

        `prefill_only` (prefill role): stop after the first token, whose delta says
        `prefilled`, and hold the prompt's blocks until `release_prefilled`. `priority`:
        0 = online, > 0 = offline (served after online work, preempted first). `images`:
        the prompt's images in order, each placeholder expanded to its token count.
        """
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_token_ids, mm = self._multimodal_prompt(prompt_token_ids, images)
        self.validate(prompt_token_ids, params, disaggregated=prefill_only)
        if priority < 0:
            raise ValueError(f"priority must be 0 (online) or more (offline), got {priority}")
        if prefill_only and params.use_beam_search:
            # The decode side's beams start from the prompt's logits, not from the token
            # sampled here: nothing may end the request at that token.
            params = replace(params, ignore_eos=True, stop_token_ids=[], min_tokens=0,
                             max_tokens=max(2, params.max_tokens))  # fmt: skip
        seq = Sequence(
            request_id, prompt_token_ids, params, prefill_only=prefill_only, priority=priority
        )
        seq.mm = mm
        seq.grammar = self._grammar_matcher(prompt_token_ids, params)
        self.sequences[request_id] = [seq] if prefill_only else self._beams(seq)
        if self.tiers is not None and self.config.enable_prefix_caching:
            prefill_cost = self.step_stats.recent_prefill_seconds_per_token
            if self.tiers.admit(seq, prefill_cost):
                return  # queued when its prefix is back on the device (`_step_tiers`)
        self.scheduler.add(seq)

    def validate(
        self, prompt_token_ids: list[int], params: SamplingParams, disaggregated: bool = False
    ) -> None:
        vocab, bs = self.model_config.vocab_size, self.config.block_size
        params.validate(vocab)
        if disaggregated and params.n != 1 and not params.use_beam_search:
            raise ValueError("n > 1 is not supported with prefill/decode disaggregation")
        if params.num_beams > self.config.max_num_seqs:
            raise ValueError(
                f"beam_width ({params.num_beams}) exceeds this instance's --max-num-seqs "
                f"({self.config.max_num_seqs})"
            )
        beam_blocks = params.num_beams * -(-(len(prompt_token_ids) + params.max_tokens) // bs)
        if beam_blocks > self.block_manager.num_blocks:
            # Beams wait for each other every step: a group the pool cannot hold would
            # never advance (shared blocks make this bound conservative).
            raise ValueError(
                f"beam_width {params.num_beams} beams of {len(prompt_token_ids)} + "
                f"{params.max_tokens} tokens may need {beam_blocks} KV blocks; this instance "
                f"has {self.block_manager.num_blocks}"
            )
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_token_ids) >= self.max_model_len:
            raise RequestRejected(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"the prompt has {len(prompt_token_ids)} tokens; this model's context is "
                f"{self.max_model_len} tokens, and at least one must be left to generate",
            )
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    def _multimodal_prompt(
        self, prompt_token_ids: list[int], images: list[ImageInput] | None
    ) -> tuple[list[int], MultimodalPrompt | None]:
        if not images:
            return prompt_token_ids, None
        model = self.runner.model
        if not self.runner.multimodal:
            raise ValueError(f"the model {self.model_config.architecture} does not take images")
        merge = model.vision_config.spatial_merge_size
        return build_prompt(prompt_token_ids, images, model.image_token_id, merge)

    def _grammar_matcher(
        self, prompt_token_ids: list[int], params: SamplingParams
    ) -> GrammarMatcher | None:
        """A constrained request's matcher, past the output its prompt replays (None for
        free text); ValueError if the grammar does not compile or the replay breaks it."""
        if params.structured is None:
            return None
        if self.grammars is None:
            from xllm.engine.grammar import GrammarCache  # xgrammar loads only when needed

            mc = self.model_config
            self.grammars = GrammarCache(self.config.model, mc.vocab_size, mc.eos_token_ids)
        return self.grammars.matcher(params.structured, prompt_token_ids)

    def _beams(self, seq: Sequence) -> list[Sequence]:
        """The request's sequences: for beam search, its group's live beams (from `seq`).
        ValueError for a trie name not registered here (where the beams run: a prefill
        instance needs none)."""
        params = seq.params
        if not params.use_beam_search:
            return [seq]
        trie = None
        if params.allowed_items is not None:
            trie = ItemTrie(params.allowed_items)
        elif params.item_trie is not None:
            trie = self.item_tries.get(params.item_trie)
            if trie is None:
                known = ", ".join(sorted(self.item_tries)) or "none"
                raise ValueError(
                    f"item_trie {params.item_trie!r} is not registered (known: {known})"
                )
        group = BeamGroup(seq, self.max_model_len, self.model_config.eos_token_ids, trie)
        return group.beams

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is and free its blocks; False if unknown or done."""
        seqs = self.sequences.pop(request_id, None)
        if seqs is None:
            return False
        for seq in seqs:
            if self.tiers is not None and self.tiers.forget(seq):
                seq.status, seq.finish_reason = SequenceStatus.FINISHED, FinishReason.ABORT
            elif not seq.is_finished:
                self.scheduler.finish(seq, FinishReason.ABORT)
        return True

    # -- PD disaggregation ----------------------------------------------------------------

    def reserve_remote_prefill(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        images: list[ImageInput] | None = None,
    ) -> Reservation | None:
        """Decode side: hold blocks for a prompt another instance prefills; None if the pool
        is short, or while its prefix loads from the KV tiers (then the reservation finds
        it cached, and the prefill side sends only the rest: after a failover, a request's
        prompt KV comes from host, disk or the store, not over again from the prefill side).
        Raises ValueError when the request is invalid.

        NOTE: `abort_request` frees the blocks at once. While the prefill side may still be
        writing into them, the caller must defer the abort until that write is reported
        done or failed, or the late bytes land in another request's blocks."""
        if request_id in self.sequences:
            raise ValueError(f"request id {request_id!r} is already in use")
        prompt_token_ids, mm = self._multimodal_prompt(prompt_token_ids, images)
        self.validate(prompt_token_ids, params, disaggregated=True)
        seq = Sequence(request_id, prompt_token_ids, params, priority=priority)
        seq.mm = mm  # decoding needs its M-RoPE delta
        seq.grammar = self._grammar_matcher(prompt_token_ids, params)
        if self.tiers is not None and self.config.enable_prefix_caching:
            prefill_cost = self.step_stats.recent_prefill_seconds_per_token
            if self.tiers.prefetch(seq, prefill_cost):
                return None  # asked again after a step, once its prefix is on the device
        seqs = self._beams(seq)
        if not self.scheduler.reserve(seq):
            return None
        self.sequences[request_id] = seqs
        num_cached_blocks = seq.num_cached_tokens // self.config.block_size
        return Reservation(
            list(seq.block_table), seq.num_cached_tokens, seq.block_table[num_cached_blocks:]
        )

    def commit_remote_prefill(
        self, request_id: str, first_token_id: int, first_logprob: Logprob | None = None
    ) -> FinishReason | None:
        """Decode side: the reserved blocks now hold the prompt's KV; decode from the first
        token (already streamed by the prefill side). Returns the finish reason if that
        token ends the request (its blocks are then freed). A grammar's fresh matcher here
        advances past that token, as the prefill side's did. A beam search ignores the
        token: its first beams come from the prompt's logits, computed again here."""
        seq = self._held(request_id)
        if seq.beam is not None:
            return self.scheduler.admit_prefilled(seq, None)
        if seq.grammar is not None:
            from xllm.engine.grammar import accept_tokens

            accept_tokens([seq], [first_token_id])
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
        """Prefill side: the KV was sent (or is no longer wanted); free the blocks.

        Like `abort_request`, only once no write is reading them any more."""
        self.scheduler.finish(self._held(request_id), None)
        del self.sequences[request_id]

    def _held(self, request_id: str) -> Sequence:
        seqs = self.sequences.get(request_id)
        if not seqs or seqs[0].status is not SequenceStatus.HELD:
            raise KeyError(f"request {request_id!r} holds no blocks here")
        return seqs[0]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self.tiers and self.tiers.num_loading)

    # -- the loop -------------------------------------------------------------------------

    def step(self) -> list[SequenceOutput]:
        if self.overlap is not None and self.overlap.overlaps:
            return self.overlap.step(self)
        started = time.perf_counter()
        if self.tiers is not None:
            self._step_tiers()
        out = self.schedule()
        if not out.scheduled:
            self.copy_swaps(out)  # a sequence may have swapped itself out
            return []
        return self.run_step(out, started)

    def run_step(self, out: SchedulerOutput, started: float) -> list[SequenceOutput]:
        """Run a scheduled step synchronously: copies, forward pass, outputs."""
        scheduled = time.perf_counter()
        execute = partial(self._execute, out)
        seqs, sampled = self.overlap.on_forward_thread(execute) if self.overlap else execute()
        executed = time.perf_counter()
        deltas = self._finish_step(out, seqs, sampled, started)
        record_scheduler(self.step_stats, scheduled - started + time.perf_counter() - executed)
        return deltas

    def _execute(self, out: SchedulerOutput) -> tuple[list[Sequence], SamplerOutput]:
        self.before_forward(out)
        return self.runner.execute(out)

    def before_forward(self, out: SchedulerOutput) -> None:
        """What must happen on the forward thread right before a step's forward pass."""
        self.copy_swaps(out)
        if self.experts is not None:
            self.experts.before_step()  # a re-placement switches here, between forward passes

    def schedule(self) -> SchedulerOutput:
        """The next step; its swaps are not copied yet (`copy_swaps`)."""
        offline_budget = offline_token_budget(
            self.config.offline_step_share,
            self.decode_step_seconds,
            self.step_stats.recent_prefill_seconds_per_token,
        )
        return self.scheduler.schedule(self._num_draft_tokens(), offline_budget)

    def copy_swaps(self, out: SchedulerOutput) -> None:
        """A step's swaps, before its forward pass (which may reuse the freed blocks)."""
        if out.swap_out:
            self.swap_space.copy_out(self.runner.kv_cache, out.swap_out)
        if out.swap_in:
            self.swap_space.copy_in(self.runner.kv_cache, out.swap_in)

    def _finish_step(
        self, out: SchedulerOutput, seqs: list[Sequence], sampled: SamplerOutput, started: float
    ) -> list[SequenceOutput]:
        """Feed a forward pass's samples back (`seqs` sampled them): the deltas."""
        shape = step_shape(out)  # before update()
        num_before = {i.seq.seq_id: i.seq.num_tokens for i in out.scheduled if i.draft_token_ids}
        for seq, logprob in zip(seqs, sampled.logprobs, strict=True):
            if logprob is not None:
                seq.logprobs.append(logprob)
        tokens = {seq.seq_id: tok for seq, tok in zip(seqs, sampled.token_ids, strict=True)}
        for _parent, child in out.forks:
            self.sequences[child.request_id].append(child)
        self.step_stats.num_steps += 1
        updated = self.scheduler.update(out, tokens, sampled.verified)
        deltas = [
            self._delta(seq, seq.num_tokens - num_before.get(seq.seq_id, seq.num_tokens - 1))
            for seq in updated
            if seq.beam is None
        ]
        if sampled.beams is not None:
            deltas += self._advance_beams(sampled.beams)
        shape.num_accepted_tokens = sum(len(t) - 1 for t in sampled.verified.values())
        shape.seconds = time.perf_counter() - started
        self._measure(shape, seqs)
        return deltas

    def _advance_beams(self, candidates: BeamCandidates) -> list[SequenceOutput]:
        """Advance the beam groups whose beams all sampled; the outputs of those that ended."""
        outputs: list[SequenceOutput] = []
        copies: list[tuple[int, int]] = []
        for group in ready_groups(candidates):
            first = group.beams[0]
            copies += group.advance(self.scheduler)
            if group.done:
                self.sequences.pop(group.request_id, None)
                results = group.results()
                outputs += [
                    beam_output(first, index, results[index] if index < len(results) else None)
                    for index in range(group.params.n)
                ]
        if copies:  # before the next forward pass writes the forks' next tokens
            self.runner.kv_cache.copy_blocks(copies)
        return outputs

    def _step_tiers(self) -> None:
        """Copy last step's new blocks to host memory (before this step's forward pass may
        overwrite them) and queue the requests whose prefix finished loading (waiting a
        little for one when nothing else can run)."""
        assert self.tiers is not None
        self.tiers.write_through()
        prefill_cost = self.step_stats.recent_prefill_seconds_per_token
        for seq in self.tiers.retry_waiting(prefill_cost):
            self.scheduler.add(seq)
        for seq in self.tiers.poll(wait=not self.scheduler.has_unfinished()):
            self.scheduler.add(seq)

    def _num_draft_tokens(self) -> int:
        """This step's k: drafts per decoding sequence (0 = a plain step)."""
        if self.speculation is None:
            return 0
        return self.speculation.num_draft_tokens(len(self.scheduler.running))

    def _measure(self, shape: SpeculativeStep, sampled: list[Sequence]) -> None:
        self.num_draft_tokens += shape.num_draft_tokens
        self.num_accepted_draft_tokens += shape.num_accepted_tokens
        # The first step pays one-time costs (kernels, allocator): it is left out.
        if self.step_stats.num_steps > 1:
            record_step(self.step_stats, shape.seconds, shape.num_prefill_tokens, shape.num_decodes)
            if shape.num_prefill_tokens == 0 and shape.num_draft_tokens == 0:
                # Plain decode steps only: the basis of the offline budget must not grow
                # with the offline prompt chunks it admits.
                weight = 0.1 if self.decode_step_seconds else 1.0
                self.decode_step_seconds += weight * (shape.seconds - self.decode_step_seconds)
            if self.speculation is not None:
                self.speculation.record(shape)
        for seq in sampled:
            if seq.num_output_tokens == 1 and seq.index == 0:  # a prompt's first token
                record_first_token(self.step_stats, time.monotonic() - seq.arrival_time)

    def _delta(self, seq: Sequence, num_new_tokens: int = 1) -> SequenceOutput:
        """The last `num_new_tokens` tokens of `seq` (several after a verification)."""
        if seq.is_finished:
            self._forget_if_done(seq.request_id)
        return sequence_delta(seq, num_new_tokens)

    def _forget_if_done(self, request_id: str) -> None:
        seqs = self.sequences.get(request_id)
        if seqs and all(s.is_finished for s in seqs) and len(seqs) == seqs[0].params.n:
            del self.sequences[request_id]

    # -- statistics, as the heartbeat carries them (read between steps or from another thread:
    # one step stale at worst) --------------------------------------------------------------

    def load_stats(self) -> LoadStats:
        reserved = [
            seq
            for seqs in self.sequences.values()
            for seq in seqs
            if seq.status is SequenceStatus.HELD and not seq.prefill_only
        ]
        return self.scheduler.load_stats(reserved)

    def preemption_stats(self) -> PreemptionStats:
        sched, swap = self.scheduler, self.swap_space.stats
        return PreemptionStats(
            num_preemptions=sched.num_preemptions,
            num_swapped=len(sched.swapped),
            num_swap_outs=sched.num_swap_outs,
            swap_out_blocks=swap.blocks_out,
            swap_in_blocks=swap.blocks_in,
            swap_seconds=swap.seconds,
        )

    def tier_stats(self) -> KvTierStats:
        return self.tiers.tier_stats() if self.tiers is not None else KvTierStats()

    def speculation_stats(self) -> SpeculationStats:
        spec = self.speculation
        return SpeculationStats(
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_draft_tokens=self.num_accepted_draft_tokens,
            recent_acceptance_rate=spec.acceptance_rate if spec else 0.0,
            speculating=spec.speculating if spec else False,
            method=self.config.speculative,
        )

    def expert_stats(self) -> ExpertStats:
        return self.experts.expert_stats() if self.experts is not None else ExpertStats()
