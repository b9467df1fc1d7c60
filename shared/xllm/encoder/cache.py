"""The encoder's image-embedding cache: LRU by content hash, bounded in bytes.

Every entry is registered with the Mooncake engine (readers fetch it by address). An entry
evicted stays registered and alive for `grace` seconds more, so a reader holding a ref
handed out just before the eviction still reads the right bytes.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import torch

RETIRE_GRACE = 60.0
"""Seconds an evicted entry stays readable: longer than a prefill waits to read it."""


class EmbeddingCache:
    def __init__(
        self,
        capacity_bytes: int,
        register: Callable[[torch.Tensor], None],
        unregister: Callable[[torch.Tensor], None],
        grace: float = RETIRE_GRACE,
    ):
        self.capacity_bytes = capacity_bytes
        self.register, self.unregister, self.grace = register, unregister, grace
        self.entries: OrderedDict[int, torch.Tensor] = OrderedDict()
        self.nbytes = 0
        self._retired: list[tuple[float, torch.Tensor]] = []

    def get(self, content_hash: int) -> torch.Tensor | None:
        if self.capacity_bytes <= 0:
            return None  # no cache: the entry kept is only there for its reader
        tensor = self.entries.get(content_hash)
        if tensor is not None:
            self.entries.move_to_end(content_hash)
        return tensor

    def put(self, content_hash: int, tensor: torch.Tensor) -> torch.Tensor:
        """Register and keep `tensor` (made contiguous); returns what readers should read."""
        tensor = tensor.detach().contiguous()
        self.register(tensor)
        self.entries[content_hash] = tensor
        self.nbytes += tensor.nbytes
        # The newest entry is kept even past the capacity (it has a reader coming).
        while self.nbytes > self.capacity_bytes and len(self.entries) > 1:
            _, old = self.entries.popitem(last=False)
            self.nbytes -= old.nbytes
            self._retired.append((time.monotonic() + self.grace, old))
        self.sweep()
        return tensor

    def sweep(self, now: float | None = None) -> None:
        """Unregister and free the evicted entries whose grace is over."""
        now = time.monotonic() if now is None else now
        keep = []
        for deadline, tensor in self._retired:
            if deadline <= now:
                self.unregister(tensor)
            else:
                keep.append((deadline, tensor))
        self._retired = keep
