"""EncodeRoleConfig: the encode role's options, the same in every process that serves it."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.config import option


@dataclass(frozen=True)
class EncodeRoleConfig:
    max_batch_images: int = option(
        8, "Images one vision-tower call encodes at most (requests waiting are batched)."
    )
    embedding_cache_mb: float = option(
        256.0, "Megabytes of image embeddings kept (LRU, by content hash); 0 = no cache."
    )

    def validate(self) -> None:
        if self.max_batch_images < 1:
            raise ValueError("--max-batch-images must be at least 1")
        if self.embedding_cache_mb < 0:
            raise ValueError("--embedding-cache-mb cannot be negative")
