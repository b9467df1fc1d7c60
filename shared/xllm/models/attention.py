"""Paged attention over the KV pool, for a flat batch of decodes and prefill chunks.

A step's tokens are laid out flat, decodes first:

    rows  [0, num_decodes)            one token per decoding sequence
    rows  [num_decodes, N)            prefill chunks, one contiguous run per sequence

Every layer writes the step's new K/V into the pool at `slot_mapping` (slot = block_id *
block_size + offset), then attends. A prefill chunk with no cached context attends to its
own fresh K/V (causal). Decodes and chunks that continue a cached prefix read their
context from the pool through slot indices built once per step in `AttentionMetadata`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class PrefillChunk:
    start: int
    """First row of this chunk in the flat batch."""
    length: int
    context_len: int
    """Tokens already in the cache before this chunk (prefix hit or earlier chunks)."""
    slots: torch.Tensor | None = None
    """[context_len + length] slots of the whole context, when context_len > 0."""
    mask: torch.Tensor | None = None
    """[length, context_len + length] bool, True = may attend (causal, offset by context)."""


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] where each new token's K/V goes
    num_decodes: int = 0
    decode_slots: torch.Tensor | None = None  # [B, T] context slots per decode (padded)
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, T] bool, True = real context
    prefills: list[PrefillChunk] = field(default_factory=list)


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        # Bound by the model runner once the pool exists: [num_slots, num_kv_heads, head_dim].
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q [N, H, D], k/v [N, Hkv, D] -> [N, H * D]."""
        self.k_cache.index_copy_(0, meta.slot_mapping, k)
        self.v_cache.index_copy_(0, meta.slot_mapping, v)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], meta)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], chunk)
        return out.view(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        assert meta.decode_slots is not None
        k = self.k_cache[meta.decode_slots].transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_cache[meta.decode_slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, D]
            k,
            v,
            attn_mask=meta.decode_mask,
            scale=self.scale,
            enable_gqa=True,
        )
        return o.squeeze(2)  # [B, H, D]

    def _prefill(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunk: PrefillChunk
    ) -> torch.Tensor:
        if chunk.context_len:
            assert chunk.slots is not None
            k, v = self.k_cache[chunk.slots], self.v_cache[chunk.slots]  # [T, Hkv, D]
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [H, L, D]
            k.transpose(0, 1),  # [Hkv, T, D]
            v.transpose(0, 1),
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=self.scale,
            enable_gqa=True,
        )
        return o.transpose(0, 1)  # [L, H, D]
