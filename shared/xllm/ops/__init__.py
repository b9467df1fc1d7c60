"""Native CPU kernels for the decode hot path, compiled on first use, with torch fallbacks.

`paged_decode_attention` reads each sequence's context straight from the paged KV pool
(no gather); `linear` streams weights once per step for small batches (AVX512-BF16).
The extension is built once per machine by torch's cpp_extension (needs a C++ compiler
and ninja) into torch's extension cache; where it cannot be built, or the device is not
a CPU, callers get `None` from `kernels()` and use plain torch ops instead.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger(__name__)

_SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False

# Largest batch for which the streaming bf16 linear beats oneDNN here (measured, see
# benchmarks/kernels.py); beyond it the matmul is compute-bound and oneDNN's AMX wins.
BF16_LINEAR_MAX_ROWS = 4


def kernels() -> ModuleType | None:
    """The compiled extension, or None when it is disabled or cannot be built."""
    global _module, _tried
    if _tried:
        return _module
    with _lock:
        if not _tried:
            _module = _build()
            _tried = True
    return _module


def _build() -> ModuleType | None:
    if os.environ.get("XLLM_NATIVE_KERNELS", "1") == "0":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(
            name="xllm_cpu_kernels",
            sources=[str(_SOURCE)],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler must not stop serving
        log.warning("native CPU kernels unavailable (%s); using torch fallbacks", e)
        return None


def fast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor | None:
    """x @ W^T + b via the streaming kernel when it applies, else None."""
    if (
        x.dim() != 2
        or x.shape[0] > BF16_LINEAR_MAX_ROWS
        or x.dtype != torch.bfloat16
        or x.device.type != "cpu"
        or x.shape[1] % 32
    ):
        return None
    k = kernels()
    if k is None or not k.has_bf16_linear():
        return None
    return k.bf16_linear(x, weight, bias)
