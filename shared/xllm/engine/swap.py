"""SwapSpace: host memory that holds preempted offline sequences' KV blocks.

The same layout as the device pool (`KVCache`), [num_layers, 2, num_slots, Hkv, D], in
`num_blocks` host blocks; which host block holds what is the scheduler's bookkeeping
(`Scheduler.free_host_blocks`, `Sequence.host_block_table`). Each step's copies are
batched: one gather and one scatter over all the blocks a step swaps, in either direction.
Pinned where the platform pins (CUDA, NPU), so copies to and from the device are DMA; on
the CPU the "device" pool is host memory too, and the copies are plain memory moves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from xllm.engine.kv_cache import KVCache
from xllm.platform import pins_host_memory


@dataclass
class SwapStats:
    blocks_out: int = 0
    blocks_in: int = 0
    bytes_moved: int = 0
    seconds: float = 0.0


class SwapSpace:
    def __init__(self, like: KVCache, num_blocks: int):
        layers, kv, _, heads, dim = like.tensor.shape
        self.block_size = like.block_size
        self.num_blocks = num_blocks
        # Allocated untouched: host pages are committed only when a block is swapped out.
        self.tensor = torch.empty(
            layers, kv, num_blocks * like.block_size, heads, dim,
            dtype=like.tensor.dtype, pin_memory=pins_host_memory(like.tensor.device),
        )  # fmt: skip
        self.bytes_per_block = self.tensor[:, :, : like.block_size].numel() * self.tensor.itemsize
        self.stats = SwapStats()

    def copy_out(self, kv: KVCache, pairs: list[tuple[int, int]]) -> None:
        """Device block -> host block, for every (device, host) pair."""
        self._copy(kv.tensor, self.tensor, pairs)
        self.stats.blocks_out += len(pairs)

    def copy_in(self, kv: KVCache, pairs: list[tuple[int, int]]) -> None:
        """Host block -> device block, for every (host, device) pair."""
        self._copy(self.tensor, kv.tensor, pairs)
        self.stats.blocks_in += len(pairs)

    def _copy(self, src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]]) -> None:
        started = time.perf_counter()
        src_slots = self._slots([s for s, _ in pairs], src.device)
        dst_slots = self._slots([d for _, d in pairs], dst.device)
        # dim 2 is the slot: every layer's K and V for those blocks move in one go.
        dst.index_copy_(2, dst_slots, src.index_select(2, src_slots).to(dst.device))
        self.stats.bytes_moved += len(pairs) * self.bytes_per_block
        self.stats.seconds += time.perf_counter() - started

    def _slots(self, blocks: list[int], device: torch.device) -> torch.Tensor:
        offsets = torch.arange(self.block_size)
        starts = torch.tensor(blocks, dtype=torch.long).unsqueeze(1) * self.block_size
        return (starts + offsets).flatten().to(device)
