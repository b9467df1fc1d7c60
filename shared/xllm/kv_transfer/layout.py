"""Where a KV block's bytes sit in an engine's pool (`KvLayout`), as (offset, length) runs.

The pool (engine/kv_cache.py) is one contiguous tensor [L, 2, num_slots, Hkv, D] with
slot = block_id * block_size + offset. So one block is 2L runs, one per (layer, K/V)
plane, each `block_size * Hkv * D * itemsize` bytes long:

    plane p = 2 * layer + kv            (kv: 0 = K, 1 = V)
    offset(p, block) = p * plane_bytes + block * block_bytes_per_plane

Blocks with consecutive ids are adjacent within every plane, so a run of consecutive
blocks is still 2L runs, just longer. Two pools may hold different numbers of blocks
(plane_bytes differs) but must agree on everything else to exchange blocks.
"""

from __future__ import annotations

import torch

from xllm.protocol.kv_peer import KvLayout


def layout_of(tensor: torch.Tensor, block_size: int) -> KvLayout:
    """The layout of a KV pool tensor [L, 2, num_slots, Hkv, D] (must be contiguous)."""
    assert tensor.dim() == 5 and tensor.shape[1] == 2 and tensor.is_contiguous()
    num_layers, _, num_slots, num_kv_heads, head_dim = tensor.shape
    assert num_slots % block_size == 0
    token_bytes = num_kv_heads * head_dim * tensor.element_size()
    return KvLayout(num_layers, num_slots // block_size, block_size, token_bytes)


def block_runs(layout: KvLayout, block_id: int, num_blocks: int = 1) -> list[tuple[int, int]]:
    """(offset, length) of blocks [block_id, block_id + num_blocks) in every plane."""
    assert block_id >= 0 and block_id + num_blocks <= layout.num_blocks
    start = block_id * layout.plane_block_bytes
    length = num_blocks * layout.plane_block_bytes
    return [(p * layout.plane_bytes + start, length) for p in range(2 * layout.num_layers)]


def pair_runs(src: list[int], dst: list[int]) -> list[tuple[int, int, int]]:
    """Group block pairs src[i] -> dst[i] into (src_start, dst_start, count) runs where both
    sides are consecutive, so each run moves as 2L writes instead of 2L per block."""
    assert len(src) == len(dst), (len(src), len(dst))
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src, dst, strict=True):
        if runs:
            s0, d0, n = runs[-1]
            if s == s0 + n and d == d0 + n:
                runs[-1] = (s0, d0, n + 1)
                continue
        runs.append((s, d, 1))
    return runs


def block_segments(
    src: KvLayout, dst: KvLayout, src_blocks: list[int], dst_blocks: list[int]
) -> list[tuple[int, int, int]]:
    """(src_offset, dst_offset, length) byte segments copying `src_blocks` into `dst_blocks`."""
    if not src.compatible_with(dst):
        raise ValueError(f"KV layouts cannot exchange blocks: {src} vs {dst}")
    segments: list[tuple[int, int, int]] = []
    for s, d, n in pair_runs(src_blocks, dst_blocks):
        for (so, length), (do, _) in zip(block_runs(src, s, n), block_runs(dst, d, n), strict=True):
            segments.append((so, do, length))
    return segments
