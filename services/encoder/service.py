"""The encoder service: Qwen2-VL's vision tower behind NATS, embeddings out by Mooncake.

    EncodeRequest ──► decode + preprocess each image (its content hash is the cache key)
                  ──► cache hit: nothing to run          miss: queued for the tower
                  ──► the batcher runs the tower on up to `max_batch_images` queued images
                      in one call (on the tower thread), caches and registers the rows
                  ──► EncodeReply: one EmbeddingRef per image (endpoint, address, shape)

The prompt's instance reads the bytes itself (`xllm.kv_transfer.embeddings`); nothing but
the refs goes over NATS. Heartbeats (role `encode`) carry `EncoderStats`.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from nats.aio.client import Client as NATS

from services.encoder.cache import EmbeddingCache
from services.encoder.config import EncoderConfig
from services.encoder.tower import VisionTower
from xllm.engine.multimodal import ImageInput
from xllm.image_processor import ImageProcessorConfig
from xllm.kv_transfer.embeddings import EmbeddingExchange
from xllm.protocol import (
    EncodeReply,
    EncodeRequest,
    EncoderStats,
    ErrorCode,
    ErrorInfo,
    Heartbeat,
    Role,
    TypeDispatcher,
    encode,
    make_callback,
    subjects,
)

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Pending:
    """An image waiting for the tower; every request asking for it awaits `done`."""

    image: ImageInput
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EncoderService:
    def __init__(self, config: EncoderConfig, nc: NATS, tower: VisionTower):
        self.config = config
        self.nc = nc
        self.tower = tower
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.model_name = config.served_model_name or Path(config.model).resolve().name
        self.started_at = time.time()
        processor = ImageProcessorConfig.from_dir(config.model)
        if processor is None:
            raise ValueError(f"{config.model} has no image processor config")
        self.processor = processor
        host = config.transfer_host or socket.gethostbyname(socket.gethostname())
        self.exchange = EmbeddingExchange(host)
        self.cache = EmbeddingCache(
            int(config.embedding_cache_mb * 1e6), self.exchange.register, self.exchange.unregister
        )
        self.stats = EncoderStats()
        self.queue: list[Pending] = []
        self.in_flight: dict[int, Pending] = {}
        """Images queued or in the tower, by content hash (a second ask joins the first)."""
        self._wake = asyncio.Event()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="vision-tower")

    async def serve(self, stop: asyncio.Event) -> None:
        requests = TypeDispatcher({EncodeRequest: self.on_encode}, name="encoder")
        sub = await self.nc.subscribe(
            subjects.encoder_cmd(self.instance_id), cb=make_callback(requests)
        )
        tasks = [asyncio.create_task(self._batcher()), asyncio.create_task(self._heartbeat(stop))]
        log.info("encoder %s up (Mooncake at %s)", self.instance_id, self.exchange.endpoint)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await sub.unsubscribe()

    async def on_encode(self, req: EncodeRequest) -> EncodeReply:
        try:
            images = [ImageInput.from_bytes(image.data, self.processor) for image in req.images]
        except ValueError as e:
            error = ErrorInfo(code=ErrorCode.INVALID_REQUEST, message=str(e))
            return EncodeReply(request_id=req.request_id, error=error)
        waits = [self._embeddings(image) for image in images]
        try:
            tensors = await asyncio.gather(*waits)
        except Exception as e:  # the tower failed: the scheduler falls back to colocated
            log.exception("encoding the images of %s failed", req.request_id)
            error = ErrorInfo(code=ErrorCode.INTERNAL, message=f"encoding failed: {e}")
            return EncodeReply(request_id=req.request_id, error=error)
        refs = []
        for image, tensor in zip(images, tensors, strict=True):
            refs.append(self.exchange.ref(tensor, image.grid_thw, image.content_hash))
            self.stats.bytes_published += tensor.nbytes
        return EncodeReply(request_id=req.request_id, embeddings=refs)

    def _embeddings(self, image: ImageInput) -> asyncio.Future:
        """The image's registered embeddings: from the cache, or once the tower ran."""
        self.stats.cache_queries += 1
        cached = self.cache.get(image.content_hash)
        if cached is not None:
            self.stats.cache_hits += 1
            done = asyncio.get_running_loop().create_future()
            done.set_result(cached)
            return done
        pending = self.in_flight.get(image.content_hash)
        if pending is None:
            pending = self.in_flight[image.content_hash] = Pending(image)
            self.queue.append(pending)
            self._wake.set()
        return pending.done

    async def _batcher(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                batch = self.queue[: self.config.max_batch_images]
                del self.queue[: len(batch)]
                images = [p.image for p in batch]
                start = time.perf_counter()
                try:
                    out = await loop.run_in_executor(self._thread, self.tower.encode, images)
                except Exception as e:
                    for p in batch:
                        self.in_flight.pop(p.image.content_hash, None)
                        p.done.set_exception(e)
                    continue
                self.stats.encode_seconds += time.perf_counter() - start
                self.stats.batches += 1
                self.stats.images_encoded += len(batch)
                for p, tensor in zip(batch, out, strict=True):
                    self.in_flight.pop(p.image.content_hash, None)
                    p.done.set_result(self.cache.put(p.image.content_hash, tensor))
                self.stats.cache_bytes = self.cache.nbytes

    async def _heartbeat(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.cache.sweep()
            self.stats.cache_bytes = self.cache.nbytes
            hb = Heartbeat(
                instance_id=self.instance_id,
                started_at=self.started_at,
                role=Role.ENCODE,
                model=self.model_name,
                max_model_len=0,
                kv_block_size=0,
                kv_transfer_endpoint=self.exchange.endpoint,
                sent_at=time.time(),
                encoder=copy.copy(self.stats),
            )
            await self.nc.publish(subjects.HEARTBEAT, encode(hb))
            await asyncio.sleep(self.config.heartbeat_interval)
