"""An instance's load snapshot, as the `Heartbeat` it publishes every `heartbeat_interval`.

Built on the event loop, possibly while a step runs on the engine thread: it only reads the
engine's counters and queues, and a snapshot one step old serves placement as well.
"""

from __future__ import annotations

import dataclasses
import time

from xllm.engine.engine import Engine
from xllm.kv_transfer import KvTransport
from xllm.protocol import Heartbeat, Role


def build_heartbeat(
    *,
    instance_id: str,
    started_at: float,
    role: Role,
    model: str,
    engine: Engine,
    role_flips: int,
    transport: KvTransport | None,
) -> Heartbeat:
    stats = engine.stats()
    scheduler = engine.scheduler
    return Heartbeat(
        instance_id=instance_id,
        started_at=started_at,
        role=role,
        model=model,
        max_model_len=engine.max_model_len,
        num_running=stats.num_running,
        num_waiting=stats.num_waiting,
        # Work, not footprint: prompt tokens served from the prefix cache cost nothing,
        # as in the scheduler's own count of what it placed since this heartbeat.
        num_tokens_in_flight=sum(
            s.num_tokens - s.num_cached_tokens for s in [*scheduler.running, *scheduler.waiting]
        ),
        kv_blocks_used=stats.num_blocks_used,
        kv_blocks_free=stats.num_blocks_free,
        kv_block_size=engine.config.block_size,
        prefix_queried_tokens=stats.prefix_queried_tokens,
        prefix_hit_tokens=stats.prefix_hit_tokens,
        num_preemptions=stats.num_preemptions,
        steps=stats.num_steps,
        sent_at=time.time(),
        role_flips=role_flips,
        num_prefill_backlog_tokens=stats.num_prefill_backlog_tokens,
        num_offline_prefill_backlog_tokens=stats.num_offline_prefill_backlog_tokens,
        num_decoding=stats.num_decoding,
        num_reserved=stats.num_reserved,
        num_reserved_tokens=stats.num_reserved_tokens,
        num_swapped=stats.num_swapped,
        num_swap_outs=stats.num_swap_outs,
        swap_out_blocks=stats.swap_out_blocks,
        swap_in_blocks=stats.swap_in_blocks,
        swap_seconds=stats.swap_seconds,
        num_draft_tokens=stats.num_draft_tokens,
        num_accepted_draft_tokens=stats.num_accepted_draft_tokens,
        recent_acceptance_rate=stats.recent_acceptance_rate,
        speculating=stats.speculating,
        **dataclasses.asdict(engine.step_stats),
        **transfer_fields(transport),
    )


def transfer_fields(transport: KvTransport | None) -> dict:
    """The heartbeat's KV-transfer fields; none (their defaults) before a transport opened."""
    if transport is None:
        return {}
    s = transport.stats
    return dict(
        kv_transfer_endpoint=transport.endpoint,
        kv_blocks_sent=s.blocks_sent,
        kv_bytes_sent=s.bytes_sent,
        kv_blocks_received=s.blocks_received,
        kv_bytes_received=s.bytes_received,
        kv_transfers=s.transfers,
        kv_transfer_seconds=s.seconds_sending,
    )
