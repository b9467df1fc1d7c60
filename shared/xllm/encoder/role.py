"""EncodeRole: answer `EncodeRequest`s with embeddings refs, running the tower in batches.

    EncodeRequest ──► decode + preprocess each image (its content hash is the cache key)
                  ──► cache hit: nothing to run          miss: queued for the tower
                  ──► the batcher runs the tower on up to `max_batch_images` queued images
                      in one call (on the tower's thread), caches and registers the rows
                  ──► EncodeReply: one EmbeddingRef per image (endpoint, address, shape)

The prompt's instance reads the bytes itself (`xllm.kv_transfer.embeddings`); nothing but
the refs goes over NATS. The counters go in `stats`, which the process's heartbeat sends.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
from nats.aio.client import Client as NATS

from xllm.encoder.cache import EmbeddingCache
from xllm.encoder.config import EncodeRoleConfig
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

Tower = Callable[[list[ImageInput]], list[torch.Tensor]]
"""One vision-tower call: images -> each image's embeddings [tokens, hidden] (own memory)."""


@dataclass(eq=False)
class Pending:
    """An image waiting for the tower; every request asking for it awaits `done`."""

    image: ImageInput
    done: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class EncodeRole:
    def __init__(
        self,
        config: EncodeRoleConfig,
        nc: NATS,
        instance_id: str,
        processor: ImageProcessorConfig,
        tower: Tower,
        executor: Executor,
        exchange: EmbeddingExchange,
        stats: EncoderStats | None = None,
    ):
        """`tower` runs on `executor` (an instance passes its engine thread: encodes then
        run between steps, on the thread that owns the weights)."""
        config.validate()
        self.config, self.nc, self.instance_id = config, nc, instance_id
        self.processor, self.tower, self.executor = processor, tower, executor
        self.exchange = exchange
        self.cache = EmbeddingCache(
            int(config.embedding_cache_mb * 1e6), exchange.register, exchange.unregister
        )
        self.stats = stats if stats is not None else EncoderStats()
        self.queue: list[Pending] = []
        self.in_flight: dict[int, Pending] = {}
        """Images queued or in the tower, by content hash (a second ask joins the first)."""
        self._wake = asyncio.Event()

    async def serve(self, stop: asyncio.Event) -> None:
        requests = TypeDispatcher({EncodeRequest: self.on_encode}, name="encoder")
        sub = await self.nc.subscribe(
            subjects.encoder_cmd(self.instance_id), cb=make_callback(requests)
        )
        batcher = asyncio.create_task(self._batcher())
        log.info("encode role of %s up (Mooncake at %s)", self.instance_id, self.exchange.endpoint)
        try:
            await stop.wait()
        finally:
            batcher.cancel()
            await sub.unsubscribe()

    async def heartbeats(
        self, stop: asyncio.Event, model: str, started_at: float, interval: float
    ) -> None:
        """Publish this endpoint's heartbeat (role `encode`) every `interval` seconds: what
        makes the scheduler send it encodes, and what carries its counters."""
        while not stop.is_set():
            self.cache.sweep()  # evicted entries past their grace are freed here
            self.stats.cache_bytes = self.cache.nbytes
            hb = Heartbeat(
                instance_id=self.instance_id,
                started_at=started_at,
                role=Role.ENCODE,
                model=model,
                max_model_len=0,
                kv_block_size=0,
                kv_transfer_endpoint=self.exchange.endpoint,
                sent_at=time.time(),
                encoder=copy.copy(self.stats),
            )
            try:
                await self.nc.publish(subjects.HEARTBEAT, encode(hb))
            except Exception:
                log.exception("encode role heartbeat failed")
            await asyncio.sleep(interval)

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
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self.queue:
                batch = self.queue[: self.config.max_batch_images]
                del self.queue[: len(batch)]
                await self._run(batch)

    async def _run(self, batch: list[Pending]) -> None:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self.executor, self.tower, [p.image for p in batch])
        except Exception as e:
            for p in batch:
                self.in_flight.pop(p.image.content_hash, None)
                p.done.set_exception(e)
            return
        self.stats.encode_seconds += time.perf_counter() - start
        self.stats.batches += 1
        self.stats.images_encoded += len(batch)
        for p, tensor in zip(batch, out, strict=True):
            self.in_flight.pop(p.image.content_hash, None)
            p.done.set_result(self.cache.put(p.image.content_hash, tensor))
        self.stats.cache_bytes = self.cache.nbytes


def engine_tower(engine) -> Tower:
    """The tower of an engine's own model (an instance serving the encode role too): the
    weights its prefills use, no second copy. Call on the engine's thread."""
    from xllm.engine.multimodal import encode_images

    model, device = engine.runner.model, engine.runner.device

    @torch.inference_mode()
    def encode_on_engine(images: list[ImageInput]) -> list[torch.Tensor]:
        return [rows.cpu().clone() for rows in encode_images(model, images, device)]

    return encode_on_engine
