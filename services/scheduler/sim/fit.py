"""Fitting a profile's factors to measured steps, and the measurements' file.

A `Measurement` is one engine step as it ran (its `StepShape`) and how long it took. With
`overlap` = 1 the profile's step time is linear in its seven factors, so fitting is least
squares; the factors are kept non-negative (a negative cost has no meaning and
extrapolates badly) by solving every subset and keeping the best feasible one.
"""

from __future__ import annotations

import itertools
import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from services.scheduler.cost_model import StepCost, StepShape, step_cost
from xllm.hardware import HardwareProfile
from xllm.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class Measurement:
    label: str
    """What was measured, for people (`decode 8x512`)."""
    step: StepShape
    """The step as the engine actually ran it (contexts grow by one per decode step)."""
    seconds: float


FACTORS = (
    "overhead",
    "per_seq",
    "linear_factor",
    "attn_factor",
    "decode_attn_factor",
    "weight_factor",
    "kv_factor",
)


def features(cost: StepCost, peak: float, bw: float) -> list[float]:
    """The terms `HardwareProfile.time_of` multiplies by each factor (overlap = 1)."""
    return [
        1.0,
        float(cost.num_seqs),
        cost.linear_flops / peak,
        cost.prefill_attn_flops / peak,
        cost.decode_attn_flops / peak,
        cost.weight_bytes / bw,
        cost.kv_bytes / bw,
    ]


def fit_factors(
    model: ModelConfig, data: list[Measurement], base: HardwareProfile
) -> HardwareProfile:
    """Non-negative least squares on relative error: every subset of the factors is solved
    exactly and the best all-non-negative solution kept (seven factors: 127 small solves)."""
    peak, bw = base.peak(model.dtype), base.mem_bw
    x = np.array([features(step_cost(model, m.step), peak, bw) for m in data])
    y = np.array([m.seconds for m in data])
    xw, yw = x / y[:, None], np.ones_like(y)  # rows scaled by 1/y: residuals are relative
    best, best_err = np.zeros(len(FACTORS)), float("inf")
    for k in range(1, len(FACTORS) + 1):
        for subset in itertools.combinations(range(len(FACTORS)), k):
            coef, *_ = np.linalg.lstsq(xw[:, subset], yw, rcond=None)
            if (coef < 0).any():
                continue
            err = float(np.sum((xw[:, subset] @ coef - yw) ** 2))
            if err < best_err:
                best_err = err
                best = np.zeros(len(FACTORS))
                best[list(subset)] = coef
    return base.with_factors(overlap=1.0, **dict(zip(FACTORS, map(float, best), strict=True)))


def relative_errors(
    model: ModelConfig, data: list[Measurement], hw: HardwareProfile
) -> list[float]:
    """(predicted - measured) / measured for each measurement."""
    return [hw.time_of(step_cost(model, m.step), model.dtype) / m.seconds - 1 for m in data]


def fit_summary(
    model: ModelConfig, hw: HardwareProfile, train: list[Measurement], held_out: list[Measurement]
) -> dict[str, float]:
    train_err = relative_errors(model, train, hw)
    test_err = relative_errors(model, held_out, hw)
    return {
        "train_max_abs_rel_err": max(map(abs, train_err)),
        "held_out_max_abs_rel_err": max(map(abs, test_err)),
        "held_out_median_abs_rel_err": statistics.median(map(abs, test_err)),
    }


def save_measurements(
    path: str | Path,
    train: list[Measurement],
    held_out: list[Measurement],
    hw: HardwareProfile,
    model: ModelConfig,
) -> None:
    """One JSON line per measurement with its prediction: the evidence behind a profile."""
    rows = [("train", m) for m in train] + [("held_out", m) for m in held_out]
    errors = relative_errors(model, train, hw) + relative_errors(model, held_out, hw)
    lines = []
    for (split, m), err in zip(rows, errors, strict=True):
        row = {
            "split": split,
            "shape": m.label,
            "decode_context_lens": m.step.decode_context_lens,
            "prefill_chunks": m.step.prefill_chunks,
            "num_prefill_samples": m.step.num_prefill_samples,
            "measured_s": m.seconds,
            "rel_err": err,
        }
        lines.append(json.dumps(row))
    Path(path).write_text("\n".join(lines) + "\n")


def load_measurements(path: str | Path) -> tuple[list[Measurement], list[Measurement]]:
    """(train, held_out) back from `save_measurements`' file."""
    train: list[Measurement] = []
    held_out: list[Measurement] = []
    for line in Path(path).read_text().splitlines():
        row = json.loads(line)
        step = StepShape(
            tuple(row["decode_context_lens"]),
            tuple(tuple(c) for c in row["prefill_chunks"]),
            row["num_prefill_samples"],
        )
        m = Measurement(row["shape"], step, row["measured_s"])
        (train if row["split"] == "train" else held_out).append(m)
    return train, held_out


def refit(profile_path: str | Path, model: ModelConfig) -> HardwareProfile:
    """Fit `profile_path`'s factors again from the measurements saved beside it (after a
    change to the cost model, without measuring again); rewrites both files."""
    path = Path(profile_path)
    measurements = path.with_suffix(".measurements.jsonl")
    train, held_out = load_measurements(measurements)
    profile = fit_factors(model, train, HardwareProfile.from_json(path))
    profile = replace(profile, fit=fit_summary(model, profile, train, held_out))
    profile.save(path)
    save_measurements(measurements, train, held_out, profile, model)
    return profile
