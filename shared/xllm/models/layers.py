"""Building blocks shared by the model zoo: linear layers, RMSNorm, rotary embedding, MLP.

Parameters are created empty (weights always come from a checkpoint), so building a
0.6B model costs no random init. Fused projections (q|k|v, gate|up) are one matmul each
on the hot path; `shard_sizes` tells the loader where each checkpoint tensor goes.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xllm.ops import fast_linear, fast_norm_rotary, fast_rms_norm, fast_silu_mul, pack_weight


class Linear(nn.Module):
    """y = x @ W^T + b, with W [out_features, in_features] filled by the loader."""

    def __init__(
        self,
        in_features: int,
        out_features: int | list[int],
        bias: bool = False,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        shard_sizes = out_features if isinstance(out_features, list) else [out_features]
        total = sum(shard_sizes)
        self.weight = nn.Parameter(
            torch.empty(total, in_features, dtype=dtype), requires_grad=False
        )
        self.weight.shard_sizes = shard_sizes  # type: ignore[attr-defined]
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(total, dtype=dtype), requires_grad=False)
            self.bias.shard_sizes = shard_sizes  # type: ignore[attr-defined]

        self.packed_weight: torch.Tensor | None = None

    def prepare(self) -> None:
        """After loading: keep a copy of the weight in the native kernels' tile layout."""
        self.packed_weight = pack_weight(self.weight.data)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fast_linear(x, self.weight, self.bias, self.packed_weight)  # decode batches on CPU
        return F.linear(x, self.weight, self.bias) if y is None else y


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and rounded once (Hugging Face rounds
    before scaling by the weight, so in bfloat16 the two may differ by one ulp)."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = fast_rms_norm(x, self.weight, self.eps)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps) if y is None else y


class GatedMLP(nn.Module):
    """SwiGLU MLP: down(silu(gate(x)) * up(x)), gate and up fused into one matmul."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = Linear(hidden, [intermediate, intermediate], dtype=dtype)
        self.down_proj = Linear(intermediate, hidden, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        h = fast_silu_mul(gate_up)  # one pass on CPU
        if h is None:
            gate, up = gate_up.chunk(2, dim=-1)  # [N, I] each
            h = F.silu(gate) * up
        return self.down_proj(h)


# Checkpoint names of the shards of each fused projection: HF name -> (our name, shard).
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (rotate-half form), with Llama 3 and linear scaling.

    cos/sin are computed in float32 for every position once, then cast to the model dtype,
    which is what Hugging Face does per step; the values are identical.
    """

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        theta: float,
        scaling: dict[str, Any] | None,
        dtype: torch.dtype,
    ):
        super().__init__()
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        inv_freq = scale_inv_freq(inv_freq, scaling)
        positions = torch.arange(max_position, dtype=torch.int64).float()
        freqs = torch.outer(positions, inv_freq)  # [P, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.register_buffer("cos", emb.cos().to(dtype), persistent=False)
        self.register_buffer("sin", emb.sin().to(dtype), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)  # [N, 1, D]


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: RMSNorm | None = None
) -> torch.Tensor:
    """x [N, H, D] (each head RMS-normalised by `norm` first, if given) rotated by its
    positions' cos/sin [N, 1, D]."""
    weight, eps = (None, 0.0) if norm is None else (norm.weight, norm.eps)
    y = fast_norm_rotary(x, cos, sin, weight, eps)  # one pass on CPU
    if y is not None:
        return y
    if norm is not None:
        x = norm(x)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def scale_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    if not scaling:
        return inv_freq
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind in ("default", "mrope"):  # M-RoPE moves positions, not frequencies (qwen2_vl.py)
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"rope scaling {kind!r} is not supported (supported: default, linear, llama3)")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by `factor`,
    short ones kept, the band between interpolated smoothly."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
