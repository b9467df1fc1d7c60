"""Native CPU kernels for the decode hot path, compiled on first use, with torch fallbacks.

`paged_decode_attention` reads each sequence's context straight from the paged KV pool
(no gather); `fast_linear` streams weights once per step for decode-sized batches, over
weights packed once at load (AMX tiles, AVX512-BF16 dot products where there is no AMX, or
bf16 widened to fp32 FMAs on AVX2-only CPUs: csrc/avx2.h);
`fast_rms_norm` is one pass instead of ATen's ten small ops; `fast_silu_mul` and
`fast_norm_rotary` fuse SwiGLU's and (Qwen3's per-head norm +) RoPE's elementwise ops into
one pass each (csrc/elementwise.h, AVX-512F).
The extension is built once per machine by torch's cpp_extension (needs a C++ compiler
and ninja) into torch's extension cache; where it cannot be built, or the device is not
a CPU, callers get `None` from `kernels()` and use plain torch ops instead.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_CSRC = Path(__file__).parent / "csrc"
_SOURCE = _CSRC / "cpu_kernels.cpp"
_SOURCES = [_SOURCE, _CSRC / "decode_stack.cpp"]  # (graph mode's one-call decode step)
_lock = threading.Lock()
_module: ModuleType | None = None
_tried = False
_enabled = True
_linear: tuple | None = None

# Largest batches for which the native linears beat oneDNN on 2 cores (decode-sized
# matmuls are memory bound, and oneDNN re-packs the weights every call): AMX measured on a
# Sapphire Rapids, AVX512-BF16 on a Zen 4.
AMX_LINEAR_MAX_ROWS = 128
BF16_LINEAR_MAX_ROWS = 128
# AVX2 + FMA (Zen 3): oneDNN has no bf16 units to use there and runs bf16 matmuls at
# ~10 GFLOP/s a core, the native kernel at ~85 from 6 to 512 rows and at the memory
# bandwidth for 1-2 (benchmarks/native_kernels.py), so it wins at every batch measured;
# the limit only bounds the float copy of x it makes (rows x K x 4 bytes).
AVX2_LINEAR_MAX_ROWS = 8192


def use_native_kernels(enabled: bool) -> None:
    """Allow or forbid the native kernels for this process (`EngineConfig.native_kernels`);
    takes effect only before the first `kernels()` call, which builds or skips them once."""
    global _enabled
    _enabled = enabled


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
    if not _enabled:
        return None
    try:
        from torch.utils.cpp_extension import load

        # Named by the source's path and contents: torch rebuilds an extension whose
        # sources moved or changed, so one fixed name would make every checkout on a
        # machine rebuild it for the others (stalling their first step for a minute).
        key = str(_SOURCE.resolve()).encode()
        for source in sorted(_CSRC.iterdir()):  # the .cpp and the headers it includes
            key += source.name.encode() + source.read_bytes()
        digest = hashlib.sha256(key).hexdigest()[:12]
        return load(
            name=f"xllm_cpu_kernels_{digest}",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # a missing compiler must not stop serving
        log.warning("native CPU kernels unavailable (%s); using torch fallbacks", e)
        return None


def fast_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """RMSNorm via the native kernel on CPU, else None."""
    if x.device.type != "cpu":
        return None
    k = kernels()
    return None if k is None else k.rms_norm(x, weight, eps)


def _fused_elementwise(x: torch.Tensor) -> ModuleType | None:
    """The kernels when they have the fused bf16 elementwise passes for x, else None."""
    if x.dtype != torch.bfloat16 or x.device.type != "cpu":
        return None
    native = kernels()
    return native if native is not None and native.has_fused_elementwise() else None


def fast_silu_mul(x: torch.Tensor) -> torch.Tensor | None:
    """F.silu(gate) * up for x = gate | up [N, 2I] in one pass on CPU (bf16), else None."""
    native = _fused_elementwise(x)
    if native is None or x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 32:
        return None
    return native.silu_mul(x)


def fast_norm_rotary(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    weight: torch.Tensor | None = None,
    eps: float = 0.0,
) -> torch.Tensor | None:
    """RoPE of x [N, H, D] (after a per-head RMSNorm by `weight`, if given) in one pass on
    CPU (bf16, D % 32 == 0), contiguous, else None."""
    native = _fused_elementwise(x)
    if native is None or x.dim() != 3 or x.shape[-1] % 32 or x.stride(2) != 1:
        return None
    if x.stride(1) != x.shape[2] or cos.dtype != x.dtype or sin.dtype != x.dtype:
        return None
    if weight is not None and weight.dtype != x.dtype:
        return None
    return native.norm_rope(x, weight, eps, cos, sin)


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """W [N, K] in the VNNI layout the native linears multiply, [N/16, K/2, 16, 2] (for
    each pair of input features, 16 output columns' pairs side by side), or None when no
    native linear applies (not bf16 on CPU; no AMX, AVX512-BF16 or AVX2; for AMX and
    AVX512-BF16, N % 16 or K % 32). The AVX2 kernel takes any shape: W is zero-padded to
    N % 16 == 0 and K % 2 == 0 here."""
    n, k = weight.shape
    if weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
        return None
    native = kernels()
    if native is None:
        return None
    if native.has_avx2_linear():
        if n % 16 or k % 2:
            weight = F.pad(weight, (0, -k % 2, 0, -n % 16))
            n, k = weight.shape
    elif n % 16 or k % 32 or not (native.has_amx() or native.has_bf16_linear()):
        return None
    return weight.view(n // 16, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()


def _native_linear() -> tuple:
    """(kernel, largest batch it beats oneDNN at) of this CPU's native linear, found once."""
    global _linear
    if _linear is None:
        native = kernels()
        assert native is not None  # a packed weight exists only where the kernels do
        if native.has_amx():
            _linear = (native.amx_linear, AMX_LINEAR_MAX_ROWS)
        elif native.has_avx2_linear():
            _linear = (native.packed_bf16_linear, AVX2_LINEAR_MAX_ROWS)
        else:
            _linear = (native.packed_bf16_linear, BF16_LINEAR_MAX_ROWS)
    return _linear


def fast_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    packed: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """x @ W^T + b via a native kernel when one beats oneDNN for this shape, else None."""
    if packed is None or x.dim() != 2 or x.dtype != torch.bfloat16:
        return None
    kernel, max_rows = _native_linear()
    return kernel(x, packed, weight.shape[0], bias) if x.shape[0] <= max_rows else None


def native_linear_choice() -> tuple[int, int]:
    """(kernel, largest batch) of `fast_linear`'s choice, for native code that repeats it:
    kernel 0 = none (F.linear), 1 = packed_bf16_linear, 2 = amx_linear."""
    native = kernels()
    if native is None:
        return 0, 0
    _, max_rows = _native_linear()
    return (2 if native.has_amx() else 1), max_rows
