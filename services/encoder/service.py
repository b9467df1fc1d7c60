"""The encoder service: Qwen2-VL's vision tower alone, serving the encode role.

What it answers and how is `xllm.encoder.role.EncodeRole` (the same code a decode instance
runs in ED+P); this process adds the tower loaded from the checkpoint's `visual.*` weights,
the thread it runs on, and heartbeats (role `encode`) carrying the role's `EncoderStats`.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nats.aio.client import Client as NATS

from services.encoder.config import EncoderConfig
from services.encoder.tower import VisionTower
from xllm.encoder.config import EncodeRoleConfig
from xllm.encoder.role import EncodeRole
from xllm.image_processor import ImageProcessorConfig
from xllm.kv_transfer.embeddings import EmbeddingExchange


class EncoderService:
    def __init__(
        self, config: EncoderConfig, role_config: EncodeRoleConfig, nc: NATS, tower: VisionTower
    ):
        self.config = config
        self.nc = nc
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.model_name = config.served_model_name or Path(config.model).resolve().name
        self.started_at = time.time()
        processor = ImageProcessorConfig.from_dir(config.model)
        if processor is None:
            raise ValueError(f"{config.model} has no image processor config")
        host = config.transfer_host or socket.gethostbyname(socket.gethostname())
        thread = ThreadPoolExecutor(1, thread_name_prefix="vision-tower")
        self.role = EncodeRole(
            role_config, nc, self.instance_id, processor, tower.encode, thread,
            EmbeddingExchange(host),
        )  # fmt: skip

    async def serve(self, stop: asyncio.Event) -> None:
        beats = self.role.heartbeats(
            stop, self.model_name, self.started_at, self.config.heartbeat_interval
        )
        heartbeats = asyncio.create_task(beats)
        try:
            await self.role.serve(stop)
        finally:
            heartbeats.cancel()
