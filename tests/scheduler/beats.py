"""Hand-made heartbeats for policy tests: an idle instance unless a field says otherwise."""

from __future__ import annotations

import dataclasses

from xllm.protocol import Heartbeat

GROUPS = {
    f.name: f.default_factory
    for f in dataclasses.fields(Heartbeat)
    if dataclasses.is_dataclass(f.default_factory)
}
"""Heartbeat field -> its stats type (`load` -> LoadStats, ...)."""
GROUP_OF = {f.name: group for group, cls in GROUPS.items() for f in dataclasses.fields(cls)}
"""Stats field -> the Heartbeat field holding it (`num_running` -> "load")."""
assert len(GROUP_OF) == sum(len(dataclasses.fields(c)) for c in GROUPS.values()), "not unique"


def heartbeat(instance_id: str, role: str = "both", **fields) -> Heartbeat:
    """An idle instance's heartbeat, but for `fields`: Heartbeat fields, or the fields of its
    stats groups by their own names (`num_running=3, blocks_free=10, recent_tpot=0.5`)."""
    top = dict(model="m", max_model_len=4096, kv_block_size=16, sent_at=0.0)
    stats: dict[str, dict] = {group: {} for group in GROUPS}
    stats["kv"]["blocks_free"] = 100
    for name, value in fields.items():
        if name in GROUP_OF:
            stats[GROUP_OF[name]][name] = value
        else:
            top[name] = value
    groups = {group: GROUPS[group](**values) for group, values in stats.items()}
    return Heartbeat(instance_id=instance_id, role=role, **groups | top)
