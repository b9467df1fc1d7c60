"""KvEventPublisher: an instance's prefix-cache changes, batched onto `KV_EVENTS`.

The engine's `BlockManager` appends ("stored" | "evicted", block hash) as blocks enter and
leave its prefix cache. The instance's engine loop calls `collect()` between steps (never
while a step runs, never from a NATS callback: the block manager is not thread-safe), and a
timer calls `flush()` every `interval` seconds to publish what was collected as one
`KvEvents` message. So the kvstore learns of a change at most about `interval` seconds late,
at the cost of one small message per interval while the cache changes, none while idle.

Message numbering (the kvstore's loss detection, see `xllm.protocol.kv`): every message
gets the next `seq`, starting at 0. The first message an instance sends is a `reset` with
no events ("forget whatever an earlier process with my id left behind"). `snapshot()`
answers a `KvSnapshotRequest`: it drops the unsent deltas (the snapshot already contains
their effect) and sends every cached block hash, the first chunk with `reset=True`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from nats.aio.client import Client as NATS

from xllm.engine.block_manager import BlockManager
from xllm.protocol import KvEvent, KvEvents, encode, subjects

if TYPE_CHECKING:
    from xllm.engine.kv_tiers import KvTiers

log = logging.getLogger(__name__)

DEVICE_TIER = "device"
"""The block manager's tier; the slower ones (`KvTiers`) name their own."""

MAX_EVENTS_PER_MESSAGE = 8192
"""~20 bytes per event on the wire: far below NATS's default 1 MiB payload limit."""


class KvEventPublisher:
    """Buffers one instance's KV events and publishes them in order, numbered by `seq`.

    All methods run on the instance's event loop; `collect` and `snapshot` must be called
    only while no engine step is running.
    """

    def __init__(self, nc: NATS, instance_id: str, tier: str = DEVICE_TIER):
        self.nc = nc
        self.instance_id = instance_id
        self.tier = tier
        self.seq = 0
        """The `seq` of the next message."""
        self.pending: list[KvEvent] = []

    def collect(self, block_manager: BlockManager, tiers: KvTiers | None = None) -> None:
        """Move the block manager's new events, and the slower tiers' if any, into the
        unsent batch."""
        for kind, block_hash in block_manager.drain_events():
            self.pending.append(KvEvent(kind, block_hash, self.tier))  # type: ignore[arg-type]
        if tiers is not None:
            self.pending += [KvEvent(*e) for e in tiers.drain_events()]  # type: ignore[arg-type]

    async def reset(self) -> None:
        """Publish an empty reset: "I hold nothing". Sent when the instance starts (clearing
        what a previous process with this id left in the index) and when it stops cleanly."""
        self.pending = []
        await self._publish([], reset=True)

    async def flush(self) -> None:
        """Publish the unsent batch, if any, in chunks of at most MAX_EVENTS_PER_MESSAGE."""
        events, self.pending = self.pending, []
        step = MAX_EVENTS_PER_MESSAGE
        for start in range(0, len(events), step):
            await self._publish(events[start : start + step])

    async def snapshot(self, block_manager: BlockManager, tiers: KvTiers | None = None) -> int:
        """Publish every cached block, in every tier (first message `reset=True`); returns
        the number of (block, tier) copies."""
        block_manager.drain_events()  # already reflected in cached_blocks
        self.pending = []
        events = [KvEvent("stored", h, self.tier) for h in block_manager.cached_blocks]
        if tiers is not None:
            tiers.drain_events()  # likewise, in its indexes
            events += [KvEvent("stored", h, t) for h, t in tiers.held()]  # type: ignore[arg-type]
        step = MAX_EVENTS_PER_MESSAGE
        chunks = [events[i : i + step] for i in range(0, len(events), step)] or [[]]
        for i, chunk in enumerate(chunks):
            await self._publish(chunk, reset=i == 0)
        return len(events)

    async def _publish(self, events: Iterable[KvEvent], reset: bool = False) -> None:
        msg = KvEvents(instance_id=self.instance_id, events=list(events), seq=self.seq, reset=reset)
        # Numbered before the await: messages enter the client's write buffer in seq order.
        self.seq += 1
        await self.nc.publish(subjects.KV_EVENTS, encode(msg))
