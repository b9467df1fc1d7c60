"""Async scheduling (`--async-scheduling`, report §4.1): step N+1 is scheduled while step N's
forward pass runs on a second thread, so the step's CPU-side work leaves the critical path.

One `step()` call, while step N runs on the forward thread:

    engine   advance N > schedule N+1 > build N+1 > queue N+1 > wait N > N's outputs
    forward  ... forward + sample N .....................+ fill N+1 > forward + sample N+1 ...

* advance N (`_advance`): act as if N had run, as vLLM v1's async scheduler does (each
  running decode makes one token): every scheduled sequence's `num_computed_tokens` moves on
  and every sequence that samples in N gets a `PLACEHOLDER` token. The scheduler then
  schedules N+1 unchanged; a decode's input there is that placeholder. A sequence certain to
  end with N's token (max_tokens, context length) gets none: with nothing left to compute it
  is not scheduled; a prefill-only one is held at once, as `Scheduler.update` holds it.
* fill: N+1 is queued on the forward thread before N ends, and that thread, done with N,
  puts N's tokens in place of the placeholders in N+1's input tensor and runs N+1 at once:
  the only work between the two forward passes, with no thread to wake between them. The
  sequences' own placeholders are replaced with N's outputs, on the engine thread.
* N's outputs: the stop checks of `Scheduler.update`. A sequence that ended in N (EOS, a stop
  token) was scheduled in N+1 anyway: it is finished and its blocks freed now, and N+1's token
  for it is dropped (finished sequences are skipped; an abort between steps is the same).

Freeing blocks that a running step still writes is safe: a block freed now goes to a
sequence of a later step, and the forward thread runs steps in order, so the new owner writes
the block after the stray write. Blocks in the prefix cache are wholly computed: no step
writes them.

The forward thread reads no `Sequence`: a step is built on the engine thread into tensors and
`SamplingView`s (what the Sampler reads of a sequence, as it will be when the step samples).
Swaps, MoE re-placements and block copies run on the forward thread, in step order.

Contention: the two threads share the GIL, so the engine thread's Python runs beside the
forward pass only while that is in native code without the GIL (torch's ops, and the native
kernels: ops/csrc/cpu_kernels.cpp releases it). Scheduler time is counted as the engine
thread's CPU time (`time.thread_time`): time it waited for the GIL is not work it hid.

Synchronous fallback, the simplest correct choice: a step with beams, grammars or forks
runs once the step before it is done (`Engine.run_step`, on the forward thread too:
the model loads there, so its OpenMP team is the only one).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import torch

from xllm.engine.batch_layout import lay_out
from xllm.engine.model_runner import order_for_attention, run_of, sampling_rows
from xllm.engine.outputs import SequenceOutput, step_shape
from xllm.engine.sampler import SamplerOutput
from xllm.engine.scheduler import ScheduledSeq, SchedulerOutput
from xllm.engine.sequence import PLACEHOLDER, Sequence, SequenceStatus
from xllm.engine.speculation import SpeculativeStep
from xllm.engine.step_stats import record_scheduler
from xllm.models.attention import AttentionMetadata
from xllm.protocol.types import SamplingParams

if TYPE_CHECKING:
    from xllm.engine.engine import Engine
    from xllm.engine.multimodal import MultimodalPrompt

T = TypeVar("T")


@dataclass
class SamplingView:
    """What the Sampler reads of a sequence, taken when its step is built: the counts then
    are those the step samples at (a placeholder for the step before it counts as a token)."""

    params: SamplingParams
    num_prompt_tokens: int
    num_tokens: int
    generator: torch.Generator | None
    token_ids: list[int] | None
    """A copy, only in a step with penalties (its placeholder filled in with the others)."""
    grammar: None = None  # steps with grammars or beams are synchronous
    beam: None = None

    @classmethod
    def of(cls, seq: Sequence, with_tokens: bool) -> SamplingView:
        tokens = list(seq.token_ids) if with_tokens else None
        return cls(seq.params, seq.num_prompt_tokens, seq.num_tokens,
                   seq.next_token_generator(), tokens)  # fmt: skip

    @property
    def num_output_tokens(self) -> int:
        return self.num_tokens - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        assert self.token_ids is not None
        return self.token_ids[self.num_prompt_tokens :]

    def next_token_generator(self) -> torch.Generator | None:
        return self.generator


@dataclass(eq=False)
class Step:
    """A step built on the engine thread: all its forward thread needs, and its outputs'."""

    out: SchedulerOutput
    shape: SpeculativeStep
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    rows: torch.Tensor
    """Flat-batch rows whose logits are sampled, one per `seqs`."""
    seqs: list[Sequence]
    views: list[SamplingView]
    fill_rows: torch.Tensor | None = None
    """Rows of `input_ids` holding a placeholder of the step before, and (`fill_from`) the
    index of its token in that step's samples."""
    fill_from: torch.Tensor | None = None
    fill_views: list[tuple[SamplingView, int]] = field(default_factory=list)
    images: list[ScheduledSeq] = field(default_factory=list)
    """A model that takes images: the items in row order, over `ImageView`s (else empty)."""
    placeholders: set[Sequence] = field(default_factory=set)
    """The sequences given a placeholder for this step's token (`_advance`)."""
    before: Step | None = None
    """The step queued before this one, whose samples fill this one's placeholders."""
    result: Future[SamplerOutput] | None = None
    sampled: SamplerOutput | None = None
    """This step's samples, set on the forward thread when it ends (`result`'s value)."""
    started_at: float = 0.0
    ended_at: float = 0.0
    """When the forward thread started and finished the step (perf_counter)."""
    outputs_work: Work | None = None
    """The step before's output processing, which ran while this step ran."""


@dataclass(frozen=True)
class Work:
    """A stretch of the engine thread's work: when (perf_counter) and its CPU seconds."""

    start: float
    end: float
    cpu: float

    def hidden_by(self, ended: float) -> float:
        """The CPU seconds of this work done before `ended` (pro rata within the stretch)."""
        if self.end <= ended:
            return self.cpu
        if self.start >= ended:
            return 0.0
        return self.cpu * (ended - self.start) / (self.end - self.start)


@dataclass(frozen=True)
class ImageView:
    """What the vision inputs (multimodal.model_inputs) read of a sequence, at build time."""

    mm: MultimodalPrompt | None
    num_computed_tokens: int


def overlappable(out: SchedulerOutput) -> bool:
    """Whether `out` can run ahead of the step before's tokens (module doc: fallback)."""
    if out.forks:
        return False
    return all(
        seq.beam is None and seq.grammar is None and not item.draft_token_ids
        for item in out.scheduled
        for seq in (item.seq,)
    )


class AsyncSteps:
    def __init__(self, overlaps: bool):
        self.overlaps = overlaps
        """False: every step synchronous (on the forward thread still)."""
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="forward")
        """The one thread that loads the model and runs every forward pass."""
        self.running: Step | None = None
        """The step on the forward thread (its outputs not taken yet)."""

    def on_forward_thread(self, fn: Callable[[], T]) -> T:
        return self._thread.submit(fn).result()

    def step(self, engine: Engine) -> list[SequenceOutput]:
        """One step's outputs; the next step is running when this returns (if it could)."""
        started = time.perf_counter()
        if self.running is None:
            out = engine.schedule()
            if not out.scheduled:
                self.on_forward_thread(lambda: engine.copy_swaps(out))
                return []
            if not overlappable(out):
                return engine.run_step(out, started)
            self.running = self._build(engine, out, None)
            self._launch(engine, self.running)
            record_scheduler(engine.step_stats, time.perf_counter() - started)
        current = self.running
        scheduling = _begin()
        self._advance(engine, current)
        ahead = engine.schedule()
        following = None
        if ahead.scheduled and overlappable(ahead):
            following = self._build(engine, ahead, current)
            self._launch(engine, following)  # runs right after `current`, on its thread
        ahead_work = _end(scheduling)
        self.running = following
        assert current.result is not None
        sampled = current.result.result()
        outputs = _begin()
        deltas = self._outputs(engine, current, sampled)
        outputs_work = _end(outputs)
        self._count(engine, current, ahead_work, outputs_work)
        if following is not None:
            following.outputs_work = outputs_work
        else:
            deltas += self._run_after(engine, ahead)
        return deltas

    def _run_after(self, engine: Engine, out: SchedulerOutput) -> list[SequenceOutput]:
        """Run `out`, scheduled before the outputs of the step before it, synchronously now
        that they are in: without the sequences they ended (their blocks are free)."""
        out.scheduled = [item for item in out.scheduled if not item.seq.is_finished]
        if out.scheduled:
            return engine.run_step(out, time.perf_counter())
        if out.swap_out:
            self.on_forward_thread(lambda: engine.copy_swaps(out))
        return []

    def _build(self, engine: Engine, out: SchedulerOutput, before: Step | None) -> Step:
        """`out`'s inputs and sampling views; with `before` (still running), where its
        placeholders are to be filled in."""
        items = order_for_attention(out.scheduled)
        runner = engine.runner
        runs = [run_of(item) for item in items]
        input_ids, positions, meta = lay_out(runs, runner.block_size, runner.device)
        rows, seqs = sampling_rows(items, out.forks)
        penalised = any(seq.params.has_penalties for seq in seqs)  # (penalties read every row)
        views = [SamplingView.of(seq, penalised) for seq in seqs]
        step = Step(out, step_shape(out), input_ids, positions, meta,
                    torch.tensor(rows, device=runner.device), seqs, views, before=before)  # fmt: skip
        if runner.multimodal:
            step.images = [_image_item(item) for item in items]
        if before is not None and before.placeholders:
            index = {seq: k for k, seq in enumerate(before.seqs) if seq in before.placeholders}
            sampling = zip(rows, seqs, views, strict=True)
            fills = [(row, index[s], v) for row, s, v in sampling if s in index]
            if fills:
                step.fill_rows = torch.tensor([row for row, _, _ in fills], device=runner.device)
                step.fill_from = torch.tensor([k for _, k, _ in fills])
                step.fill_views = [(v, k) for _, k, v in fills if v.token_ids is not None]
        return step

    def _launch(self, engine: Engine, step: Step) -> None:
        step.result = self._thread.submit(_forward, engine, step)

    def _advance(self, engine: Engine, step: Step) -> None:
        """Move the sequences of `step` (running) on as if it had run (module doc)."""
        scheduler = engine.scheduler
        for item in step.out.scheduled:
            if not item.seq.is_finished:
                item.seq.num_computed_tokens += item.num_new_tokens
        for seq in step.seqs:
            if seq.is_finished:
                continue
            if seq.prefill_only:
                scheduler.running.remove(seq)
                seq.status = SequenceStatus.HELD  # until its blocks are sent
            elif not _ends_with_next_token(seq, scheduler.max_model_len):
                seq.token_ids.append(PLACEHOLDER)
                step.placeholders.add(seq)

    def _outputs(self, engine: Engine, step: Step, sampled: SamplerOutput) -> list[SequenceOutput]:
        """`step`'s tokens into its sequences, stop checks, deltas (`Scheduler.update`'s
        part after the forward pass, for the sequences not finished meanwhile)."""
        scheduler = engine.scheduler
        deltas: list[SequenceOutput] = []
        got: list[Sequence] = []
        for seq, token, logprob in zip(step.seqs, sampled.token_ids, sampled.logprobs, strict=True):
            if seq.is_finished:
                continue  # ended by the step before, or aborted: its token is dropped
            if seq in step.placeholders:
                assert seq.token_ids[-1] == PLACEHOLDER, seq
                seq.token_ids[-1] = token
            else:
                seq.token_ids.append(token)
            if logprob is not None:
                seq.logprobs.append(logprob)
            reason = scheduler.finish_reason(seq)
            if reason is not None:
                scheduler.finish(seq, reason)
            got.append(seq)
            deltas.append(engine._delta(seq))
        for item in step.out.scheduled:
            if not item.seq.is_finished:
                scheduler.block_manager.cache_full_blocks(item.seq)
        engine.step_stats.num_steps += 1
        step.shape.seconds = time.perf_counter() - step.started_at
        engine._measure(step.shape, got)
        return deltas

    @staticmethod
    def _count(engine: Engine, step: Step, ahead: Work, outputs: Work) -> None:
        """Scheduler time of this call, as engine-thread CPU time: scheduling and building
        the step after `step` (hidden as far as done before `step` ended) and `step`'s outputs
        (counted exposed now; their hidden part, behind the step after, with that step)."""
        ended = step.ended_at
        hidden = ahead.hidden_by(ended)
        if step.outputs_work is not None:  # the step before's outputs, made while `step` ran
            hidden += step.outputs_work.hidden_by(ended)
        record_scheduler(engine.step_stats, ahead.cpu + outputs.cpu, hidden)


def _begin() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _end(begun: tuple[float, float]) -> Work:
    start, cpu = begun
    return Work(start, time.perf_counter(), time.thread_time() - cpu)


def _ends_with_next_token(seq: Sequence, max_model_len: int) -> bool:
    """The next token ends `seq` whatever it is (max_tokens or the context length)."""
    return seq.num_output_tokens + 1 >= seq.params.max_tokens or seq.num_tokens + 1 >= max_model_len


def _image_item(item: ScheduledSeq) -> ScheduledSeq:
    view = ImageView(item.seq.mm, item.seq.num_computed_tokens)
    return ScheduledSeq(view, item.num_new_tokens, item.samples)  # type: ignore[arg-type]


def _fill(step: Step) -> None:
    """Put the tokens the step before sampled in place of its placeholders."""
    if step.fill_rows is None:
        return
    assert step.before is not None
    before = step.before.sampled
    assert before is not None, "the step before failed"
    tokens = torch.tensor(before.token_ids)
    assert step.fill_from is not None
    step.input_ids[step.fill_rows] = tokens[step.fill_from].to(step.input_ids.device)
    for view, k in step.fill_views:
        assert view.token_ids is not None
        view.token_ids[-1] = before.token_ids[k]


@torch.inference_mode()
def _forward(engine: Engine, step: Step) -> SamplerOutput:
    """On the forward thread: the step before's tokens, copies, forward pass, sampling."""
    step.started_at = time.perf_counter()
    _fill(step)
    step.before = None  # (its samples are in: the steps need not chain in memory)
    engine.before_forward(step.out)
    runner = engine.runner
    hidden = runner.forward(
        step.input_ids, step.positions, step.meta, step.images, step.out.encodes
    )
    runner.kv_cache.copy_blocks(step.out.block_copies)
    if step.views:
        logits = runner.model.compute_logits(hidden[step.rows]).cpu()  # [R, V]
        sampled = runner.sampler(logits, step.views)  # type: ignore[arg-type]
    else:
        sampled = SamplerOutput([], [])
    step.ended_at = time.perf_counter()
    step.sampled = sampled
    return sampled
