"""An instance that serves the encode role too (`--serve-encode`; ED+P puts it on the
decode instances): `xllm.encoder.role.EncodeRole` — the encoder service's own code — as
endpoint `<instance-id>-encode`, with its own heartbeats (role `encode`), so the
scheduler sends it encodes as it does an encoder service's.

It shares what the instance has: the model's vision tower (no second copy of the
weights), the engine thread (a tower call runs between two steps, never beside one: one
OpenMP team, see `engine_thread`) and the Mooncake engine the instance reads embeddings
with. Its counters are its endpoint's; the instance's heartbeat keeps its own reads.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from xllm.encoder.role import EncodeRole, engine_tower

if TYPE_CHECKING:
    from xllm.instance.instance import Instance


def encode_role_tasks(instance: Instance, stop: asyncio.Event) -> list[asyncio.Task]:
    processor = instance.engine.image_processor
    if processor is None:
        raise ValueError("--serve-encode needs a model that takes images")
    role = EncodeRole(
        instance.encode_config, instance.nc, f"{instance.instance_id}-encode", processor,
        engine_tower(instance.engine), instance.executor, instance.images.exchange(),
    )  # fmt: skip
    beats = role.heartbeats(
        stop, instance.model_name, instance.started_at, instance.config.heartbeat_interval
    )
    return [asyncio.create_task(role.serve(stop)), asyncio.create_task(beats)]
