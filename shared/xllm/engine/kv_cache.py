"""KVCache: the physical paged KV pool, one contiguous tensor for every layer.

Layout: [num_layers, 2 (K, V), num_slots, num_kv_heads, head_dim], where slot =
block_id * block_size + offset. One contiguous region is what a transfer engine
registers once; a block of one layer is a contiguous [block_size, Hkv, D] run within it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from xllm.config import EngineConfig
    from xllm.models.config import ModelConfig


class KVCache:
    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.tensor = torch.zeros(
            num_layers,
            2,
            num_blocks * block_size,
            num_kv_heads,
            head_dim,
            dtype=dtype,
            device=device,
        )

    @staticmethod
    def bytes_per_block(
        num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype
    ) -> int:
        return num_layers * 2 * block_size * num_kv_heads * head_dim * dtype.itemsize

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views [num_slots, Hkv, D] of layer `index`'s K and V."""
        return self.tensor[index, 0], self.tensor[index, 1]

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        bs = self.block_size
        for src, dst in pairs:
            self.tensor[:, :, dst * bs : (dst + 1) * bs] = self.tensor[
                :, :, src * bs : (src + 1) * bs
            ]

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()


def pool_sizes(config: EngineConfig, mc: ModelConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(device blocks, host swap blocks) the configuration gives the model's KV pool: the
    device pool from --num-kv-blocks or --kv-cache-gb (shared with a draft model's mirror
    pool, which has a block for each of the target's), the host one from --swap-space-gb."""
    per_block = KVCache.bytes_per_block(
        mc.num_hidden_layers, config.block_size, mc.num_key_value_heads, mc.head_dim, dtype
    )
    num_host_blocks = int(config.swap_space_gb * 2**30) // per_block
    if config.num_kv_blocks > 0:
        return config.num_kv_blocks, num_host_blocks
    device_per_block = per_block
    if config.draft_model:
        from xllm.engine.draft_model import DraftModel

        device_per_block += DraftModel.bytes_per_block(config.draft_model, config.block_size, dtype)
    return max(1, int(config.kv_cache_gb * 2**30) // device_per_block), num_host_blocks
