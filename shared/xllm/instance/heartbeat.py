"""An instance's load snapshot, as the `Heartbeat` it publishes every `heartbeat_interval`.

Built on the event loop, possibly while a step runs on the engine thread: it only reads the
engine's counters and queues, and a snapshot one step old serves placement as well.
"""

from __future__ import annotations

import copy
import time

from xllm.engine.engine import Engine
from xllm.instance.images import ImageInputs
from xllm.kv_transfer import KvTransport
from xllm.kv_transfer.base import stats_snapshot
from xllm.protocol import EncoderStats, Heartbeat, KvTransferStats, Role


def build_heartbeat(
    *,
    instance_id: str,
    started_at: float,
    role: Role,
    model: str,
    engine: Engine,
    role_flips: int,
    transport: KvTransport | None,
    images: ImageInputs | None = None,
) -> Heartbeat:
    return Heartbeat(
        instance_id=instance_id,
        started_at=started_at,
        role=role,
        model=model,
        max_model_len=engine.max_model_len,
        kv_block_size=engine.config.block_size,
        kv_block_bytes=engine.runner.kv_cache.nbytes // engine.block_manager.num_blocks,
        max_num_batched_tokens=engine.config.max_num_batched_tokens,
        max_num_seqs=engine.config.max_num_seqs,
        kv_transfer_endpoint=transport.endpoint if transport else None,
        sent_at=time.time(),
        role_flips=role_flips,
        load=engine.load_stats(),
        kv=engine.block_manager.kv_stats(),
        steps=copy.copy(engine.step_stats),  # the engine thread goes on counting in it
        preemption=engine.preemption_stats(),
        speculation=engine.speculation_stats(),
        transfer=stats_snapshot(transport.stats) if transport else KvTransferStats(),
        tiers=engine.tier_stats(),
        experts=engine.expert_stats(),
        encoder=encoder_stats(engine, images),
    )


def encoder_stats(engine: Engine, images: ImageInputs | None) -> EncoderStats:
    """The embeddings this instance read (`images`) and its engine's own tower calls."""
    stats = copy.copy(images.stats) if images else EncoderStats()
    tower = engine.runner.tower_stats
    stats.batches, stats.images_encoded = tower.batches, tower.images_encoded
    stats.encode_seconds = tower.encode_seconds
    return stats
