"""Qwen2-VL's vision tower: pixel patches of any number of images -> one embedding per
merged 2x2 patch, in the language model's width.

    pixel_values [P, C*T*p*p]  (P = sum of t*h*w over the images, patches in merge-block order)
      -> patch embed (a Conv3d whose stride is its kernel, so one matmul)    [P, E]
      -> depth x block: LayerNorm, full attention within each image (2-D RoPE: half of
         each head rotates by the patch's row, half by its column), LayerNorm, MLP
      -> merger: LayerNorm, then each run of merge^2 patches concatenated, MLP  [P/m^2, hidden]

Module names mirror the Hugging Face checkpoint (`visual.*`), so weights load by name. The
image processor (xllm.multimodal.image) lays the patches out merge block by merge block,
which is why the merger can take consecutive rows.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from xllm.models.layers import Linear


class VisionConfig:
    """The keys of `vision_config` we read (hub checkpoints say `in_chans`, v5 `in_channels`)."""

    def __init__(self, raw: dict[str, Any]):
        self.depth: int = raw["depth"]
        self.embed_dim: int = raw["embed_dim"]
        self.hidden_size: int = raw["hidden_size"]
        self.mlp_ratio: float = raw.get("mlp_ratio", 4)
        self.num_heads: int = raw["num_heads"]
        self.in_channels: int = raw.get("in_channels", raw.get("in_chans", 3))
        self.patch_size: int = raw.get("patch_size", 14)
        self.spatial_merge_size: int = raw.get("spatial_merge_size", 2)
        self.temporal_patch_size: int = raw.get("temporal_patch_size", 2)
        self.hidden_act: str = raw.get("hidden_act", "quick_gelu")
        rope = raw.get("rope_parameters") or {}
        self.rope_theta: float = float(rope.get("rope_theta", 10000.0))


class PatchEmbed(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype):
        super().__init__()
        c, t, p = config.in_channels, config.temporal_patch_size, config.patch_size
        self.proj = nn.Module()
        # The checkpoint's Conv3d weight; applied as a matmul over flattened patches.
        self.proj.weight = nn.Parameter(
            torch.empty(config.embed_dim, c, t, p, p, dtype=dtype), requires_grad=False
        )

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight
        return F.linear(pixel_values.to(weight.dtype), weight.flatten(1))  # [P, E]


class VisionRotary(nn.Module):
    """2-D RoPE: frequencies over a quarter of the head dim, for rows and for columns."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw_positions [P, 2] (row, column) -> cos, sin [P, 1, D] in float32."""
        freqs = hw_positions[..., None].float() * self.inv_freq  # [P, 2, D/4]
        freqs = freqs.flatten(1)  # [P, D/2]: rows' angles, then columns'
        emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
        return emb.cos(), emb.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in float32, rounded back once (as transformers does for the vision tower)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_heads
        self.qkv = Linear(config.embed_dim, 3 * config.embed_dim, bias=True, dtype=dtype)
        self.proj = Linear(config.embed_dim, config.embed_dim, bias=True, dtype=dtype)

    def forward(self, x, cos, sin, image_lens: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, -1).unbind(1)  # [P, H, D] each
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        outs = []
        start = 0
        for length in image_lens:  # each image attends only to itself, not causally
            rows = slice(start, start + length)
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1)[None],  # [1, H, L, D]
                k[rows].transpose(0, 1)[None],
                v[rows].transpose(0, 1)[None],
            )
            outs.append(o[0].transpose(0, 1).reshape(length, -1))  # [L, E]
            start += length
        return self.proj(torch.cat(outs))


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class VisionMlp(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype):
        super().__init__()
        hidden = int(config.embed_dim * config.mlp_ratio)
        self.fc1 = Linear(config.embed_dim, hidden, bias=True, dtype=dtype)
        self.fc2 = Linear(hidden, config.embed_dim, bias=True, dtype=dtype)
        self.act = quick_gelu if config.hidden_act == "quick_gelu" else F.gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.embed_dim, eps=1e-6, dtype=dtype)
        self.norm2 = nn.LayerNorm(config.embed_dim, eps=1e-6, dtype=dtype)
        self.attn = VisionAttention(config, dtype)
        self.mlp = VisionMlp(config, dtype)

    def forward(self, x, cos, sin, image_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, image_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.merged_dim = config.embed_dim * config.spatial_merge_size**2
        self.ln_q = nn.LayerNorm(config.embed_dim, eps=1e-6, dtype=dtype)
        # `mlp.0` and `mlp.2` as in the checkpoint (`mlp.1` is the GELU).
        self.mlp = nn.ModuleList(
            [
                Linear(self.merged_dim, self.merged_dim, bias=True, dtype=dtype),
                nn.GELU(),
                Linear(self.merged_dim, config.hidden_size, bias=True, dtype=dtype),
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln_q(x).view(-1, self.merged_dim)  # [P/m^2, E*m^2]
        for layer in self.mlp:
            x = layer(x)
        return x  # [P/m^2, hidden]


class Qwen2VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.spatial_merge_size = config.spatial_merge_size
        self.patch_embed = PatchEmbed(config, dtype)
        self.rotary = VisionRotary(config.embed_dim // config.num_heads, config.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(config, dtype) for _ in range(config.depth))
        self.merger = PatchMerger(config, dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.merger.ln_q.weight.dtype

    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]):
        """pixel_values [P, C*T*p*p] of the images whose patch grids are `grid_thw` ->
        embeddings [P / merge^2, hidden], the images' rows one after another."""
        cos, sin = self.rotary(self.hw_positions(grid_thw).to(pixel_values.device))
        x = self.patch_embed(pixel_values)
        image_lens = [t * h * w for t, h, w in grid_thw]
        for block in self.blocks:
            x = block(x, cos, sin, image_lens)
        return self.merger(x)

    def hw_positions(self, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """(row, column) of every patch [P, 2], in the processor's merge-block order."""
        m = self.spatial_merge_size
        runs = []
        for t, h, w in grid_thw:
            rows = torch.arange(h)[:, None].expand(h, w)
            cols = torch.arange(w)[None, :].expand(h, w)
            hw = torch.stack([rows, cols], dim=-1)  # [h, w, 2]
            hw = hw.view(h // m, m, w // m, m, 2).transpose(1, 2).reshape(-1, 2)
            runs.append(hw.repeat(t, 1))
        return torch.cat(runs)
