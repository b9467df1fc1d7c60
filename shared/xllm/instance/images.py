"""A request's images as the engine takes them: decoded here from the file bytes, or (when
an encoder instance made them) embeddings read out of band through Mooncake. An image whose
embeddings cannot be read (its encoder died, or evicted them long ago) is decoded from its
file instead, which the request still carries: the engine then runs the tower itself.

The Mooncake engine for embeddings opens on the first image that needs it, so an instance
that never sees an encoder's ref pays nothing.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Sequence

from xllm.engine.multimodal import ImageInput, decode_images
from xllm.image_processor import ImageProcessorConfig
from xllm.kv_transfer.base import KvTransferError
from xllm.protocol import EncoderStats, ImageData

log = logging.getLogger(__name__)


class ImageInputs:
    def __init__(self, host: str = ""):
        self.host = host
        """Address the Mooncake engine binds (empty = this host name's address)."""
        self.stats = EncoderStats()
        """`bytes_fetched` / `images_fetched`: what this instance read from encoders."""
        self._exchange = None

    async def inputs(
        self, images: Sequence[ImageData], config: ImageProcessorConfig | None
    ) -> list[ImageInput] | None:
        """The engine's `images=` for a request; ValueError if one is unreadable or its
        embeddings cannot be fetched (the request is rejected, nothing else stops)."""
        if not any(image.embedding for image in images):
            return decode_images(images, config)
        if config is None:
            raise ValueError("this model does not take images")
        return await asyncio.to_thread(self._fetch_all, list(images), config)

    def _fetch_all(self, images: list[ImageData], config: ImageProcessorConfig):
        out = []
        for image in images:
            ref = image.embedding
            if ref is None:
                out.extend(decode_images([image], config) or [])
                continue
            try:
                embeddings = self.exchange().fetch(ref, self.stats)
            except KvTransferError as exc:
                log.warning("embeddings at %s unreadable (%s): encoding here", ref.endpoint, exc)
                self.stats.fetch_failures += 1
                out.extend(decode_images([image], config) or [])
                continue
            grid = tuple(ref.grid_thw)
            out.append(ImageInput(grid, embeddings=embeddings, content_hash=ref.content_hash))  # type: ignore[arg-type]
        return out

    def exchange(self):
        """This process's Mooncake engine for embeddings (reads, and an encode role's refs)."""
        if self._exchange is None:
            from xllm.kv_transfer.embeddings import EmbeddingExchange

            self._exchange = EmbeddingExchange(
                self.host or socket.gethostbyname(socket.gethostname())
            )
        return self._exchange
