"""HostPool and DiskTier: where the slower KV tiers keep blocks, named by their chained hash.

Pure storage and LRU order; which block to evict, when to spill and what to report is
`KvTiers`' policy (kv_tiers.py), and all of it runs on the engine's thread. Bytes move on the
tiers' worker thread: a host block's contents are read and written there only while its hash
is pinned, and disk files are written, read and removed there in submission order.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch

from xllm.engine.kv_cache import KVCache


class HostPool:
    """Host-memory blocks in the device pool's layout ([layers, 2, slots, Hkv, D])."""

    def __init__(self, like: KVCache, num_blocks: int):
        layers, two, _, heads, dim = like.tensor.shape
        self.num_blocks = num_blocks
        self.block_size = like.block_size
        self.block_shape = (layers, two, like.block_size, heads, dim)
        # Allocated untouched: pages are committed as blocks are written.
        self.tensor = torch.empty(
            layers, two, num_blocks * like.block_size, heads, dim, dtype=like.tensor.dtype
        )
        self.bytes_per_block = self.block(0).numel() * self.tensor.itemsize
        self.index: OrderedDict[int, int] = OrderedDict()
        """block hash -> host block, least recently used first."""
        self.free = list(range(num_blocks))

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.index

    def __iter__(self) -> Iterator[int]:
        """The hashes held, least recently used first."""
        return iter(self.index)

    def __getitem__(self, block_hash: int) -> int:
        return self.index[block_hash]

    def touch(self, block_hash: int) -> None:
        self.index.move_to_end(block_hash)

    def insert(self, block_hash: int, host_block: int) -> None:
        self.index[block_hash] = host_block

    def remove(self, block_hash: int, free: bool = True) -> int:
        host_block = self.index.pop(block_hash)
        if free:
            self.free.append(host_block)
        return host_block

    def block(self, host_block: int) -> torch.Tensor:
        """The view of one host block's K and V, every layer."""
        start = host_block * self.block_size
        return self.tensor[:, :, start : start + self.block_size]

    def write(self, host_block: int, data: torch.Tensor) -> None:
        """Fill a host block from its bytes (uint8, as a disk file or the store holds it)."""
        self.block(host_block).copy_(data.view(self.tensor.dtype).view(self.block_shape))

    def check(self) -> None:
        used = list(self.index.values())
        assert len(set(used) | set(self.free)) == len(used) + len(self.free) == self.num_blocks


class DiskTier:
    """One file per block in a folder of its own under `root` (instances may share `root`;
    the folder goes when this object does). `submit` runs file I/O on the worker thread."""

    def __init__(self, root: str, num_blocks: int, submit: Callable):
        os.makedirs(root, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="xllm-kv-", dir=root)
        weakref.finalize(self, shutil.rmtree, self.dir, True)
        self.num_blocks = num_blocks
        self.submit = submit
        self.index: OrderedDict[int, None] = OrderedDict()
        """Hashes with a file, least recently used first (written or queued to be)."""

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.index

    def __iter__(self) -> Iterator[int]:
        return iter(self.index)

    def __len__(self) -> int:
        return len(self.index)

    def touch(self, block_hash: int) -> None:
        self.index.move_to_end(block_hash)

    def add(self, block_hash: int, data: torch.Tensor) -> None:
        """Queue `data` (a copy of the block, owned by the write) to its file."""
        assert len(self.index) < self.num_blocks
        self.index[block_hash] = None
        self.submit(_write_file, self.path(block_hash), data)

    def remove(self, block_hash: int) -> None:
        del self.index[block_hash]
        self.submit(os.remove, self.path(block_hash))

    def read(self, block_hash: int, num_bytes: int) -> torch.Tensor:
        """Worker thread: the block's bytes (uint8)."""
        return torch.from_file(self.path(block_hash), size=num_bytes, dtype=torch.uint8)

    def path(self, block_hash: int) -> str:
        return os.path.join(self.dir, f"{block_hash:016x}.kv")


def copy_blocks(
    src: torch.Tensor, dst: torch.Tensor, pairs: list[tuple[int, int]], block_size: int
):
    """Copy whole blocks (every layer's K and V), `src` block -> `dst` block, in one go."""
    src_slots = _slots([s for s, _ in pairs], block_size, src.device)
    dst_slots = _slots([d for _, d in pairs], block_size, dst.device)
    dst.index_copy_(2, dst_slots, src.index_select(2, src_slots).to(dst.device))


def _slots(blocks: list[int], block_size: int, device: torch.device) -> torch.Tensor:
    starts = torch.tensor(blocks, dtype=torch.long).unsqueeze(1) * block_size
    return (starts + torch.arange(block_size)).flatten().to(device)


def _write_file(path: str, data: torch.Tensor) -> None:
    data.contiguous().view(torch.uint8).numpy().tofile(path)
