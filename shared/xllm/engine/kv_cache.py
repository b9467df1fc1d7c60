"""KVCache: the physical paged KV pool, one contiguous tensor for every layer.

Layout: [num_layers, 2 (K, V), num_slots, num_kv_heads, head_dim], where slot =
block_id * block_size + offset. One contiguous region is what a transfer engine
registers once; a block of one layer is a contiguous [block_size, Hkv, D] run within it.
"""

from __future__ import annotations

import torch


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
