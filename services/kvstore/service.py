"""The kvstore service: instances' KV events in, prefix matches out, Redis as the store.

Three inputs keep the index true:

* `KV_EVENTS` — deltas, applied in order. Each instance numbers its messages; a message
  whose `seq` does not follow the last one applied (a lost message, or a kvstore that just
  started and never saw the earlier ones) is applied anyway and answered with a
  `KvSnapshotRequest` to that instance, whose reply (`reset=True` first) replaces
  everything known about it. Snapshot requests to one instance are spaced by
  `snapshot_interval`, so a burst of out-of-order deltas asks once.
* `HEARTBEAT` — liveness. An instance silent for `heartbeat_timeout` is dropped from the
  index: its blocks died with it. An instance this process has no full picture of (alive
  before this kvstore started, or back after being dropped) is asked for a snapshot at its
  first heartbeat, unless it already sent a reset (a new instance starts with one).
* startup — the index in Redis survives a kvstore restart; the instances it lists are given
  one timeout to heartbeat before they are dropped.

`KV_MATCH` requests are answered from Redis alone, so any replica can answer them.
"""

from __future__ import annotations

import asyncio
import logging
import time

from nats.aio.client import Client as NATS
from redis.asyncio import Redis

from services.kvstore.config import KvStoreConfig
from services.kvstore.index import KvIndex
from xllm.protocol import (
    Heartbeat,
    KvEvents,
    KvMatchReply,
    KvMatchRequest,
    KvSnapshotRequest,
    TypeDispatcher,
    encode,
    make_callback,
    subjects,
)

log = logging.getLogger(__name__)

REDIS_CONNECT_TIMEOUT = 30.0
"""Seconds to wait for Redis at startup (in a cluster it may start after us)."""


class KvStoreService:
    def __init__(self, config: KvStoreConfig, nc: NATS, redis: Redis):
        self.config = config
        self.nc = nc
        self.index = KvIndex(redis, config.key_prefix)
        self.last_seen: dict[str, float] = {}
        """instance -> monotonic time of its last heartbeat (or of our start, for instances
        found in Redis)."""
        self.synced: set[str] = set()
        """Instances whose full state this process has asked for or received (a reset):
        deltas alone cannot be trusted for an instance that sent some while we were down."""
        self.last_snapshot_request: dict[str, float] = {}
        self.num_snapshot_requests = 0

    async def serve(self, stop: asyncio.Event) -> None:
        await self._wait_for_redis()
        now = time.monotonic()
        for instance_id in await self.index.instances():
            self.last_seen[instance_id] = now  # one timeout to show it is still alive
        events = TypeDispatcher({KvEvents: self.on_events}, name="kvstore events")
        matches = TypeDispatcher({KvMatchRequest: self.on_match}, name="kvstore match")
        heartbeats = TypeDispatcher({Heartbeat: self.on_heartbeat}, name="kvstore heartbeats")
        queue = subjects.KVSTORE_QUEUE
        subs = [
            await self.nc.subscribe(subjects.KV_EVENTS, queue=queue, cb=make_callback(events)),
            await self.nc.subscribe(subjects.KV_MATCH, queue=queue, cb=make_callback(matches)),
            await self.nc.subscribe(subjects.HEARTBEAT, cb=make_callback(heartbeats)),
        ]
        sweeper = asyncio.create_task(self._sweep(stop))
        log.info("kvstore up: %d instances known from Redis", len(self.last_seen))
        await stop.wait()
        sweeper.cancel()
        for sub in subs:
            await sub.unsubscribe()

    async def _wait_for_redis(self) -> None:
        deadline = time.monotonic() + REDIS_CONNECT_TIMEOUT
        while True:
            try:
                await self.index.redis.ping()
                return
            except Exception as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot reach Redis: {e}") from e
                await asyncio.sleep(0.3)

    # -- handlers -----------------------------------------------------------------------

    async def on_events(self, msg: KvEvents) -> None:
        # Any message is a sign of life: an instance known only from its events (a late
        # message after it was dropped, say) is swept like one that stopped heartbeating.
        self.last_seen.setdefault(msg.instance_id, time.monotonic())
        applied = await self.index.apply(msg.instance_id, msg.events, msg.seq, msg.reset)
        if msg.reset:
            self.synced.add(msg.instance_id)
        in_order = msg.reset or applied.prev_seq == msg.seq - 1
        if not in_order:
            log.info(
                "instance %s: KV events seq %d after %s; asking for a snapshot",
                msg.instance_id,
                msg.seq,
                applied.prev_seq,
            )
            await self._request_snapshot(msg.instance_id)

    async def on_match(self, req: KvMatchRequest) -> KvMatchReply:
        match = await self.index.match_tiers(req.block_hashes, req.instance_ids)
        return KvMatchReply(
            matched_blocks=match.matched,
            matched_tiers=match.by_tier,
            store_blocks=match.store_blocks,
        )

    async def on_heartbeat(self, hb: Heartbeat) -> None:
        self.last_seen[hb.instance_id] = time.monotonic()
        if hb.instance_id not in self.synced:
            self.synced.add(hb.instance_id)
            await self._request_snapshot(hb.instance_id)

    async def _request_snapshot(self, instance_id: str) -> None:
        now = time.monotonic()
        last = self.last_snapshot_request.get(instance_id)
        if last is not None and now - last < self.config.snapshot_interval:
            return
        self.last_snapshot_request[instance_id] = now
        self.num_snapshot_requests += 1
        request = KvSnapshotRequest(instance_id=instance_id)
        await self.nc.publish(subjects.KV_SNAPSHOT_REQUEST, encode(request))

    # -- dead instances -----------------------------------------------------------------

    async def _sweep(self, stop: asyncio.Event) -> None:
        interval = self.config.heartbeat_timeout / 4
        while not stop.is_set():
            await asyncio.sleep(interval)
            try:
                await self.drop_silent_instances(time.monotonic())
            except Exception:
                log.exception("dropping silent instances failed; retrying")

    async def drop_silent_instances(self, now: float) -> list[str]:
        timeout = self.config.heartbeat_timeout
        silent = [i for i, seen in self.last_seen.items() if now - seen > timeout]
        for instance_id in silent:
            await self.index.drop_instance(instance_id)
            del self.last_seen[instance_id]
            self.synced.discard(instance_id)
            log.warning(
                "instance %s missed its heartbeats: its KV blocks left the index", instance_id
            )
        return silent
