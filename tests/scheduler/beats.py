"""Hand-made heartbeats for policy tests: an idle instance unless a field says otherwise."""

from __future__ import annotations

from xllm.protocol import Heartbeat


def heartbeat(instance_id: str, role: str = "both", **fields) -> Heartbeat:
    idle = dict(
        instance_id=instance_id,
        role=role,
        model="m",
        max_model_len=4096,
        num_running=0,
        num_waiting=0,
        num_tokens_in_flight=0,
        kv_blocks_used=0,
        kv_blocks_free=100,
        kv_block_size=16,
        prefix_queried_tokens=0,
        prefix_hit_tokens=0,
        num_preemptions=0,
        steps=0,
        sent_at=0.0,
    )
    return Heartbeat(**{**idle, **fields})
