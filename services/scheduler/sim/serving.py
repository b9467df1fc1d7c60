"""What a live cluster adds to its engines' steps, as measured inputs of the simulator.

`xllm sim calibrate` times one engine alone, its step's CPU time on a core of its own. A
live cluster on the same machine adds, and `ServingOverheads` carries (all 0 by default:
the GPU case, one device per instance and hops of well under a step):

* `request`: seconds from a client sending a request to its first token coming back,
  beyond the prefill itself: the gateway, the scheduler and the NATS hops both ways. The
  simulator places each request this long after it arrives (TTFT counts from arrival);
* `prefill_hop`: seconds more before a split request's prefill starts (live: the
  `DecodeCmd` to the decode instance, then its `PrefillCmd` to the prefill instance);
* `handoff`: seconds a PD handoff takes beyond the KV bytes' transfer (`kv_transfer_time`):
  the `KvReady` message and the decode instance taking it between two steps;
* `step`: seconds the instance's loop adds to every engine step (streaming the step's
  tokens over NATS, heartbeats);
* `cores`: CPU cores the instances share (0 = each has its own device). A step started
  while n instances are busy, itself included, lasts max(1, n / cores) times its time
  alone; the factor is fixed when the step starts (an instance that starts or stops
  mid-step does not re-price it). The other processes' CPU (gateway, NATS, the load
  generator) is not counted: on a machine they load, fewer cores are left.

None of them is a fitted constant: `fit_overheads` derives the first four from one
request sent alone to an idle live cluster (`benchmarks/pd_serving.py` sends a few before
its load and passes them to its sim prediction), as the live times less what the cost
model predicts for the same request alone; `cores` is the machine's.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from services.scheduler.cost_model import StepShape, kv_transfer_time, step_time
from xllm.hardware import HardwareProfile
from xllm.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class ServingOverheads:
    request: float = 0.0
    prefill_hop: float = 0.0
    handoff: float = 0.0
    step: float = 0.0
    cores: int = 0

    def stretch(self, num_busy: int) -> float:
        """How much longer a step lasts with `num_busy` instances stepping (itself included)."""
        return max(1.0, num_busy / self.cores) if self.cores > 0 else 1.0


@dataclass(frozen=True, slots=True)
class Probe:
    """One request sent alone to an idle live cluster, as the client saw it."""

    prompt_tokens: int
    ttft: float
    """Seconds from sending it to its first token."""
    gaps: tuple[float, ...]
    """Seconds between successive tokens after the first."""
    split: bool
    """It was prefilled on one instance and decoded on another."""


def fit_overheads(
    probes: Sequence[Probe],
    model: ModelConfig,
    hw: HardwareProfile,
    chunk_tokens: int,
    cores: int = 0,
    whole: ServingOverheads | None = None,
) -> ServingOverheads:
    """The overheads `probes` show against the cost model: the median later gap over a
    decode step alone (`step`), the least TTFT over the prediction and `step` per prefill
    step (`request`), and for split probes the least first gap over a later one and the
    KV transfer (`handoff`). `whole`: the overheads of a cluster placing requests whole,
    measured first; given, a split probe's extra TTFT over its `request` is
    `prefill_hop`. Each is at least 0 (a profile slower than the live engine reads as no
    overhead, not a negative one)."""
    later = [g for p in probes for g in p.gaps[1:]]
    decode = step_time(model, StepShape(decode_context_lens=(probes[0].prompt_tokens + 1,)), hw)
    step = max(statistics.median(later) - decode, 0.0) if later else 0.0
    ttft = min(  # the loop's overhead is paid by each prefill step too
        p.ttft
        - prefill_time(model, hw, p.prompt_tokens, chunk_tokens)
        - step * math.ceil(p.prompt_tokens / chunk_tokens)
        for p in probes
    )
    split = [p for p in probes if p.split and len(p.gaps) >= 2]
    handoff = min(
        (
            p.gaps[0] - statistics.median(p.gaps[1:]) - kv_transfer_time(model, p.prompt_tokens, hw)
            for p in split
        ),
        default=0.0,
    )
    request, hop = max(ttft, 0.0), 0.0
    if whole is not None and split:
        request, hop = whole.request, max(ttft - whole.request, 0.0)
    return ServingOverheads(request, hop, max(handoff, 0.0), step, cores)


def prefill_time(model: ModelConfig, hw: HardwareProfile, num_tokens: int, chunk: int) -> float:
    """Seconds one idle instance takes to prefill `num_tokens`, in chunks of `chunk`."""
    seconds, done = 0.0, 0
    while done < num_tokens:
        n = min(chunk, num_tokens - done)
        shape = StepShape(
            prefill_chunks=((n, done),), num_prefill_samples=int(done + n >= num_tokens)
        )
        seconds += step_time(model, shape, hw)
        done += n
    return seconds
