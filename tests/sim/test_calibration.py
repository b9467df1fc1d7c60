"""The simulator reproduces its own calibration: fit the cost model's factors to our engine
on a training grid of step shapes, then predict held-out shapes within 15%."""

from __future__ import annotations

import pytest

from services.scheduler.cost_model import load_model_config
from services.scheduler.sim import calibrate as cal
from services.scheduler.sim import fit
from xllm.hardware import HardwareProfile
from xllm.models.config import ModelConfig


def synthetic(model: ModelConfig, hw: HardwareProfile, shapes: list[cal.Shape]):
    """Measurements made by the model itself, from the calibration's own step shapes."""
    from services.scheduler.cost_model import StepShape, step_time

    out = []
    for s in shapes:
        step = StepShape(
            (s.decode_ctx,) * s.num_decodes,
            ((s.prefill, s.prefill_ctx),) if s.prefill else (),
            1 if s.prefill else 0,
        )
        out.append(fit.Measurement(str(s), step, step_time(model, step, hw)))
    return out


def test_the_fit_recovers_factors_it_was_generated_with():
    model = load_model_config("qwen3-0.6b")
    truth = HardwareProfile(
        name="t",
        peak_flops={"bfloat16": 1e12},
        mem_bw=1e11,
        interconnect_bw=1e9,
        memory_bytes=1e10,
        overhead=0.002,
        per_seq=1e-4,
        linear_factor=1.5,
        attn_factor=2.0,
        kv_factor=3.0,
        weight_factor=0.0,
        decode_attn_factor=0.0,
        overlap=1.0,
    )
    base = HardwareProfile("t", {"bfloat16": 1e12}, 1e11, 1e9, 1e10)
    fitted = fit.fit_factors(model, synthetic(model, truth, cal.TRAIN_TINY), base)
    errors = fit.relative_errors(model, synthetic(model, truth, cal.HELD_OUT_TINY), fitted)
    assert max(map(abs, errors)) < 1e-6
    assert fitted.linear_factor == pytest.approx(1.5, rel=1e-3)


def _held_out_errors(model_dir) -> tuple[dict[str, float], float]:
    profile, _train, held_out = cal.calibrate(
        model_dir,
        "float32",
        cal.TRAIN_TINY,
        cal.HELD_OUT_TINY,
        rounds=7,
        repeats=3,
        warmup=1,
        name="test",
    )
    model = load_model_config(model_dir, "float32")
    errors = {
        m.label: e
        for m, e in zip(held_out, fit.relative_errors(model, held_out, profile), strict=True)
    }
    return errors, profile.fit["held_out_max_abs_rel_err"]


@pytest.mark.slow
def test_calibrated_profile_predicts_held_out_engine_steps_within_15_percent(tiny_model_dir):
    model_dir = tiny_model_dir("qwen3", "float32")
    # Step times are measured, and on a shared 2-core machine another process can steal a
    # whole round of one shape: a second calibration (fresh measurements) is allowed. A
    # cost model that really misses a held-out shape misses it both times.
    for _ in range(2):
        errors, max_error = _held_out_errors(model_dir)
        if all(abs(e) < 0.15 for e in errors.values()):
            break
    assert all(abs(e) < 0.15 for e in errors.values()), errors
    assert max_error < 0.15
