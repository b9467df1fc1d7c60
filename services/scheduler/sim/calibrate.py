"""Calibration: time our real `Engine` on chosen step shapes and fit a profile's factors.

Each shape is one engine step we can set up exactly through the engine's own scheduler:

  * `decode(B, L)`: B sequences of L-token prompts, all decoding; time the decode steps;
  * `prefill(P, C)`: one prompt of C + P tokens whose first C count as cached; the step
    computes the last P tokens on C of context;
  * `mixed(B, L, P)`: decode(B, L) plus a fresh P-token prompt in the same step.

Robust timing on a shared machine: by default the engine runs on one thread, timed by
`time.thread_time()` — the step's CPU time, which other processes barely disturb (the wall
time of a 2-thread step under contention varied 20x here, its threads waiting for each
other at every op), so the profile predicts an instance with a core to itself. Every shape
is visited once per round, all shapes interleaved, and keeps its fastest visit (each the
median of `repeats` steps after `warmup` ones).

The factors are then fitted (fit.py) by non-negative least squares on relative error, so a
10 ms step counts as much as a 1 s one. Prefix caching is off: a repeat must recompute.
"""

from __future__ import annotations

import itertools
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from services.scheduler.cost_model import StepShape, load_model_config
from services.scheduler.sim.fit import Measurement, fit_factors, fit_summary
from xllm.hardware import GiB, HardwareProfile


@dataclass(frozen=True, slots=True)
class Shape:
    """A calibration point: `num_decodes` at `decode_ctx`, plus a `prefill` chunk at `prefill_ctx`."""

    num_decodes: int = 0
    decode_ctx: int = 0
    prefill: int = 0
    prefill_ctx: int = 0

    def __str__(self) -> str:
        parts = []
        if self.num_decodes:
            parts.append(f"decode {self.num_decodes}x{self.decode_ctx}")
        if self.prefill:
            parts.append(f"prefill {self.prefill}@{self.prefill_ctx}")
        return " + ".join(parts)


def decode(batch: int, ctx: int) -> Shape:
    return Shape(num_decodes=batch, decode_ctx=ctx)


def prefill(chunk: int, ctx: int = 0) -> Shape:
    return Shape(prefill=chunk, prefill_ctx=ctx)


def mixed(batch: int, ctx: int, chunk: int) -> Shape:
    return Shape(num_decodes=batch, decode_ctx=ctx, prefill=chunk)


# -- measuring the engine -----------------------------------------------------------------


class EngineBench:
    """Sets up the step shapes on one live `Engine` (loaded once) and times them."""

    def __init__(
        self, model_dir: str | Path, dtype: str, max_batch: int, max_ctx: int, num_threads: int = 1
    ):
        from xllm.config import EngineConfig
        from xllm.engine.engine import Engine

        self.model = load_model_config(model_dir, dtype)
        kv_gb = 1.25 * (max_batch + 1) * (max_ctx + 64) * self.model.kv_bytes_per_token / GiB
        self.engine = Engine(
            EngineConfig(
                model=str(model_dir),
                dtype=dtype,
                kv_cache_gb=max(kv_gb, 0.05),
                max_num_seqs=max_batch + 1,
                max_num_batched_tokens=max(max_batch * max_ctx, 2048),
                enable_prefix_caching=False,
                num_threads=num_threads,
            )
        )
        # One thread runs every op inline, so its CPU time is the step's; with more, only
        # wall time sees the whole step.
        self.clock = time.thread_time if num_threads == 1 else time.perf_counter
        self.vocab = self.engine.model_config.vocab_size
        self._ids = itertools.count()
        self._rng = np.random.default_rng(0)

    def _add(self, num_tokens: int, computed: int = 0, max_tokens: int = 1_000_000) -> str:
        """Queue a random prompt of `num_tokens`; its first `computed` tokens count as
        prefilled already. Their KV slots keep whatever the pool held: a step's time does not
        depend on the values, and skipping those prefills saves minutes per shape on a CPU."""
        from xllm.protocol.types import SamplingParams

        rid = f"cal-{next(self._ids)}"
        prompt = self._rng.integers(10, self.vocab, num_tokens).tolist()
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        self.engine.add_request(rid, prompt, params)
        if computed:
            self._run_as_prefilled(rid, computed)
        return rid

    def _run_as_prefilled(self, rid: str, computed: int) -> None:
        """Move request `rid` from waiting to running with its first `computed` tokens
        counted as prefilled (their KV slots allocated, not written)."""
        from xllm.engine.sequence import SequenceStatus

        scheduler = self.engine.scheduler
        seq = self.engine.sequences[rid][0]
        if not scheduler.block_manager.allocate(seq, computed):
            raise RuntimeError("benchmark KV pool too small for this shape")
        scheduler.waiting.remove(seq)
        seq.num_computed_tokens = computed
        seq.status = SequenceStatus.RUNNING
        scheduler.running.append(seq)

    def _timed_step(self) -> tuple[StepShape, float]:
        scheduler = self.engine.scheduler
        seqs = [*scheduler.running, *scheduler.waiting]
        decodes = tuple(s.num_tokens for s in seqs if s.num_computed_tokens == s.num_tokens - 1)
        chunks = tuple(
            (s.num_tokens - s.num_computed_tokens, s.num_computed_tokens)
            for s in seqs
            if s.num_computed_tokens < s.num_tokens - 1
        )
        scheduler.max_num_batched_tokens = len(decodes) + sum(n for n, _ in chunks)
        start = self.clock()
        self.engine.step()
        seconds = self.clock() - start
        return StepShape(decodes, chunks, num_prefill_samples=len(chunks)), seconds

    def _abort_all(self) -> None:
        for rid in list(self.engine.sequences):
            self.engine.abort_request(rid)

    def measure(self, shape: Shape, repeats: int, warmup: int) -> Measurement:
        """Median step time of `shape` over `repeats` runs, after `warmup` discarded ones."""
        timed: list[Measurement] = []
        for _ in range(shape.num_decodes):
            self._add(shape.decode_ctx, computed=shape.decode_ctx - 1)
        for i in range(warmup + repeats):
            rid = None
            if shape.prefill:
                total = shape.prefill_ctx + shape.prefill
                rid = self._add(total, computed=shape.prefill_ctx, max_tokens=1)
            step, seconds = self._timed_step()
            if rid is not None:
                self.engine.abort_request(rid)
            if i >= warmup:
                timed.append(Measurement(str(shape), step, seconds))
        self._abort_all()
        timed.sort(key=lambda m: m.seconds)
        return timed[len(timed) // 2]


def measure_all(
    bench: EngineBench,
    shapes: list[Shape],
    rounds: int,
    repeats: int,
    warmup: int,
    log: Callable[[str], None] = lambda _: None,
) -> list[Measurement]:
    """Visit every shape once per round and keep each shape's least disturbed visit.

    Interleaving spreads a noisy minute (a neighbour's job, memory-bandwidth contention)
    over all shapes instead of ruining the few measured during it; noise on a shared
    machine only ever adds time, so the fastest visit (each a median of `repeats` steps)
    is the best estimate of the undisturbed step.
    """
    visits: list[list[Measurement]] = [[] for _ in shapes]
    for r in range(rounds):
        for i, shape in enumerate(shapes):
            visits[i].append(bench.measure(shape, repeats, warmup))
        log(f"round {r + 1}/{rounds} done")
    out = []
    for shape, ms in zip(shapes, visits, strict=True):
        ms.sort(key=lambda m: m.seconds)
        out.append(ms[0])
        log(f"{shape}: {out[-1].seconds * 1e3:.2f} ms (spread {_spread(ms):.0%})")
    return out


def _spread(ms: list[Measurement]) -> float:
    return (ms[-1].seconds - ms[0].seconds) / ms[0].seconds


def measure_peaks(dtype: str, num_threads: int = 1, seconds: float = 1.0) -> tuple[float, float]:
    """(GEMM FLOP/s in `dtype`, memory read bytes/s) of this machine, best of a few runs.

    They only set the scale of the fitted factors (factor 1 = this micro-benchmark's speed),
    so the profile's numbers read as efficiencies.
    """
    import torch

    from xllm.models.config import parse_dtype

    dt = parse_dtype(dtype)
    if num_threads:
        torch.set_num_threads(num_threads)
    clock = time.thread_time if num_threads == 1 else time.perf_counter
    x = torch.randn(128, 1024).to(dt)  # a prefill chunk through an MLP-sized projection
    w = torch.randn(3072, 1024).to(dt)
    big = torch.ones(64 * 2**20 // 4, dtype=torch.float32)  # 64 MiB, past the caches
    flops = _best_rate(
        lambda: torch.nn.functional.linear(x, w), 2 * 128 * 1024 * 3072, seconds, clock
    )
    bw = _best_rate(lambda: big.sum(), big.numel() * 4, seconds, clock)
    return flops, bw


def _best_rate(
    fn: Callable[[], object], work: float, seconds: float, clock: Callable[[], float]
) -> float:
    fn()
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = clock()
        fn()
        best = min(best, max(clock() - start, 1e-9))
    return work / best


# -- the default grids ------------------------------------------------------------------------

# bf16 on this CPU (no native bf16 matmul) runs ~0.2 s per prefill token and ~1-14 s per
# decode step of Qwen3-0.6B shapes, so the grid is small and prefill chunks short.
TRAIN_SMALL = [
    *(decode(b, 128) for b in (1, 4, 16, 32)),
    *(decode(b, 512) for b in (1, 8, 32)),
    *(prefill(p) for p in (32, 64, 128)),
    prefill(64, 512),
]
HELD_OUT_SMALL = [
    decode(2, 256),
    decode(12, 384),
    decode(24, 256),
    prefill(96),
    prefill(48, 256),
    mixed(8, 256, 32),
]
# The tiny model's steps are mostly Python overhead at small shapes: bigger batches and
# chunks, so the model's own work (what the factors describe) dominates the noise.
TRAIN_TINY = [
    *(decode(b, c) for c in (512, 2048) for b in (8, 16, 32, 64)),
    *(prefill(p) for p in (256, 512, 1024)),
    *(prefill(p, 1024) for p in (256, 512)),
]
HELD_OUT_TINY = [
    decode(24, 1024),
    decode(48, 768),
    prefill(768),
    prefill(384, 512),
    mixed(16, 1024, 256),
]


def calibrate(
    model_dir: str | Path,
    dtype: str,
    train: list[Shape],
    held_out: list[Shape],
    rounds: int = 3,
    repeats: int = 1,
    warmup: int = 0,
    name: str = "cpu-local",
    log: Callable[[str], None] = lambda _: None,
    num_threads: int = 1,
) -> tuple[HardwareProfile, list[Measurement], list[Measurement]]:
    """Measure, fit on `train`, check on `held_out`; returns the profile and both data sets."""
    flops, bw = measure_peaks(dtype, num_threads)
    log(f"micro-benchmarks: {flops / 1e9:.1f} GFLOP/s {dtype} GEMM, {bw / 1e9:.1f} GB/s read")
    shapes = [*train, *held_out]
    max_batch = max(s.num_decodes for s in shapes)
    max_ctx = max(max(s.decode_ctx, s.prefill_ctx + s.prefill) for s in shapes)
    bench = EngineBench(model_dir, dtype, max_batch, max_ctx, num_threads)
    measure_all(bench, train[:1], rounds=1, repeats=1, warmup=1)  # first steps are slow
    data = measure_all(bench, [*train, *held_out], rounds, repeats, warmup, log)
    train_data, test_data = data[: len(train)], data[len(train) :]
    base = HardwareProfile(
        name=name,
        peak_flops={dtype: flops},
        mem_bw=bw,
        # Instances on one host trade KV over TCP loopback; between hosts assume 10 GbE.
        interconnect_bw=1.25e9,
        memory_bytes=_memory_bytes(),
        kv_cache_bytes=2 * GiB,  # EngineConfig's default --kv-cache-gb
        transfer_latency=200e-6,
        source=f"fitted by `xllm sim calibrate` on {platform.processor() or platform.machine()}, "
        f"model {Path(model_dir).name} ({dtype}), {num_threads} engine thread(s)",
    )
    profile = fit_factors(bench.model, train_data, base)
    fit = fit_summary(bench.model, profile, train_data, test_data)
    return replace(profile, fit=fit), train_data, test_data


def _memory_bytes() -> float:
    try:
        import os

        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 16 * GiB
