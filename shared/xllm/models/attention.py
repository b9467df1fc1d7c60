"""Paged attention over the KV pool, for a flat batch of decodes and prefill chunks.

A step's tokens are laid out flat, decodes first:

    rows  [0, num_decodes)            one token per decoding sequence
    rows  [num_decodes, +verify rows) speculative verifications: per sequence its last token
                                      and its drafts (`VerifyBatch`)
    rows  [.., N)                     prefill chunks, one contiguous run per sequence

Every layer writes the step's new K/V into the pool at `slot_mapping` (slot = block_id *
block_size + offset), then attends. Decodes read their context straight from the pool
through their block tables (native kernel, `xllm.ops`; a gather + SDPA fallback
elsewhere), and so do verifications, all in one call per layer: each of a sequence's rows
sees the context and, causally, the rows before it. A prefill chunk with no cached context
attends to its own fresh K/V (causal); one that continues a cached prefix gathers its
context once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xllm.ops import kernels


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
class VerifyBatch:
    """The sequences verifying speculative drafts this step, laid out after the decodes."""

    block_tables: torch.Tensor  # [B, max_blocks] int64, padded with 0
    context_lens: torch.Tensor  # [B] int64, including the step's rows
    query_starts: torch.Tensor  # [B + 1] int64: sequence b's rows are [starts[b], starts[b+1])

    @property
    def num_rows(self) -> int:
        return int(self.query_starts[-1])


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [N] where each new token's K/V goes
    block_size: int = 16
    num_decodes: int = 0
    decode_block_tables: torch.Tensor | None = None  # [B, max_blocks] int64, padded with 0
    decode_context_lens: torch.Tensor | None = None  # [B] int64, including the new token
    prefills: list[PrefillChunk] = field(default_factory=list)
    verify: VerifyBatch | None = None
    _gather: tuple[torch.Tensor, torch.Tensor] | None = None

    def decode_gather_index(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the fallback path: context slots [B, T] and validity mask [B, 1, 1, T],
        built on first use and shared by every layer of the step."""
        if self._gather is None:
            assert self.decode_block_tables is not None and self.decode_context_lens is not None
            tables, lens, bs = self.decode_block_tables, self.decode_context_lens, self.block_size
            max_len = int(lens.max())
            offsets = torch.arange(bs, device=tables.device)
            slots = (tables[:, :, None] * bs + offsets).view(len(lens), -1)[:, :max_len]
            mask = torch.arange(max_len, device=tables.device)[None, :] < lens[:, None]
            self._gather = (slots, mask[:, None, None, :])
        return self._gather


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
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # contiguous rows
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], meta, out[:nd])
        if meta.verify is not None:
            rows = slice(nd, nd + meta.verify.num_rows)
            out[rows] = self._verify(q[rows], meta.verify, meta.block_size)
        for chunk in meta.prefills:
            rows = slice(chunk.start, chunk.start + chunk.length)
            self._prefill(q[rows], k[rows], v[rows], chunk, out[rows])
        return out.view(q.shape[0], -1)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, out: torch.Tensor) -> None:
        """Fills out [B, H, D] (a contiguous row slice: the kernels write it in place)."""
        native = kernels() if q.device.type == "cpu" else None
        if native is not None:
            native.paged_decode_attention(
                out,
                q.contiguous(),
                self.k_cache,
                self.v_cache,
                meta.decode_block_tables,
                meta.decode_context_lens,
                meta.block_size,
                self.scale,
            )
            return
        # Fallback: gather each context into a padded batch (copies it once per layer).
        slots, mask = meta.decode_gather_index()
        k = self.k_cache[slots].transpose(1, 2)  # [B, Hkv, T, D]
        v = self.v_cache[slots].transpose(1, 2)
        o = F.scaled_dot_product_attention(
            q.unsqueeze(2),  # [B, H, 1, D]
            k,
            v,
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=True,
        )
        out.copy_(o.squeeze(2))  # [B, H, D]

    def _verify(self, q: torch.Tensor, batch: VerifyBatch, block_size: int) -> torch.Tensor:
        """q [R, H, D], the rows of every verifying sequence -> [R, H, D]."""
        native = kernels() if q.device.type == "cpu" else None
        if native is not None:
            out = torch.empty_like(q)
            native.paged_verify_attention(
                out,
                q.contiguous(),
                self.k_cache,
                self.v_cache,
                batch.block_tables,
                batch.context_lens,
                batch.query_starts,
                block_size,
                self.scale,
            )
            return out
        # Fallback: each sequence's context gathered, its rows causal over it.
        out = torch.empty_like(q)
        starts = batch.query_starts.tolist()
        offsets = torch.arange(block_size, device=q.device)
        for b, context_len in enumerate(batch.context_lens.tolist()):
            rows = slice(starts[b], starts[b + 1])
            n = starts[b + 1] - starts[b]
            slots = (batch.block_tables[b][:, None] * block_size + offsets).flatten()[:context_len]
            positions = torch.arange(context_len - n, context_len, device=q.device)
            mask = torch.arange(context_len, device=q.device)[None, :] <= positions[:, None]
            o = F.scaled_dot_product_attention(
                q[rows].transpose(0, 1),  # [H, n, D]
                self.k_cache[slots].transpose(0, 1),  # [Hkv, T, D]
                self.v_cache[slots].transpose(0, 1),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=True,
            )
            out[rows] = o.transpose(0, 1)
        return out

    def _prefill(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        chunk: PrefillChunk,
        out: torch.Tensor,
    ) -> None:
        """Fills out [L, H, D] (a contiguous row slice: the native kernel writes it in place)."""
        if chunk.context_len:
            assert chunk.slots is not None
            k, v = self.k_cache[chunk.slots], self.v_cache[chunk.slots]  # [T, Hkv, D]
        native = native_prefill_kernels(q)
        if native is not None:
            native.prefill_attention(out, q, k, v, chunk.context_len, self.scale)
            return
        group = self.num_heads // self.num_kv_heads
        # 4-D inputs and K/V expanded to every head: the CPU flash kernel's fast path
        # (3-D or enable_gqa inputs fall back to a much slower one).
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],  # [1, H, L, D]
            k.transpose(0, 1).repeat_interleave(group, 0)[None],  # [1, H, T, D]
            v.transpose(0, 1).repeat_interleave(group, 0)[None],
            attn_mask=chunk.mask,
            is_causal=chunk.mask is None,
            scale=self.scale,
        )
        out.copy_(o[0].transpose(0, 1))  # [L, H, D]


def native_prefill_kernels(q: torch.Tensor):
    """The native kernels when they have a prefill attention for q (bf16 on a CPU with
    AVX512-BF16 or AVX2 + FMA, head dim a multiple of 32; ~4x torch's flash kernel on
    AVX512-BF16), else None."""
    if q.dtype != torch.bfloat16 or q.device.type != "cpu" or q.shape[-1] % 32:
        return None
    native = kernels()
    if native is None or not (native.has_bf16_linear() or native.has_avx2_linear()):
        return None
    return native
