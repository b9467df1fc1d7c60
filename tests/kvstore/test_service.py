"""The kvstore service on a real nats-server and Valkey: events in, matches out, gaps
answered with snapshot requests, silent instances dropped, state surviving a restart."""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats
import pytest
from redis.asyncio import Redis

from services.kvstore.config import KvStoreConfig
from services.kvstore.service import KvStoreService
from tests.scheduler.test_policies import heartbeat
from xllm.protocol import (
    KvEvent,
    KvEvents,
    KvMatchReply,
    KvMatchRequest,
    KvSnapshotRequest,
    decode,
    decode_as,
    encode,
    subjects,
)


class Harness:
    """A kvstore service plus a NATS client that plays instances."""

    def __init__(self, nats_url: str, redis_url: str, config: KvStoreConfig):
        self.nats_url, self.redis_url, self.config = nats_url, redis_url, config
        self.snapshot_requests: list[KvSnapshotRequest] = []

    async def __aenter__(self):
        self.nc = await nats.connect(self.nats_url)
        self.service_nc = await nats.connect(self.nats_url)
        self.redis = Redis.from_url(self.redis_url)

        async def on_snapshot(msg):
            self.snapshot_requests.append(decode(msg.data))

        await self.nc.subscribe(subjects.KV_SNAPSHOT_REQUEST, cb=on_snapshot)
        await self.start_service()
        return self

    async def start_service(self) -> None:
        self.stop = asyncio.Event()
        self.service = KvStoreService(self.config, self.service_nc, self.redis)
        self.task = asyncio.create_task(self.service.serve(self.stop))
        await asyncio.sleep(0.2)  # subscribed

    async def stop_service(self) -> None:
        self.stop.set()
        await self.task

    async def __aexit__(self, *exc):
        with contextlib.suppress(Exception):
            await self.stop_service()
        await self.nc.close()
        await self.service_nc.close()
        await self.redis.aclose()

    async def events(self, instance_id: str, seq: int, *events, reset: bool = False) -> None:
        kv = [KvEvent(kind, h, "device") for kind, h in events]
        msg = KvEvents(instance_id=instance_id, events=kv, seq=seq, reset=reset)
        await self.nc.publish(subjects.KV_EVENTS, encode(msg))
        await self.nc.flush()

    async def heartbeat(self, instance_id: str) -> None:
        await self.nc.publish(subjects.HEARTBEAT, encode(heartbeat(instance_id)))
        await self.nc.flush()

    async def match(self, hashes: list[int], instance_ids: list[str] = ()) -> dict[str, int]:
        await asyncio.sleep(0.1)  # let the service apply what was published
        req = KvMatchRequest(block_hashes=hashes, instance_ids=list(instance_ids))
        reply = await self.nc.request(subjects.KV_MATCH, encode(req), timeout=2)
        return decode_as(reply.data, KvMatchReply).matched_blocks


@pytest.fixture
def harness(nats_url, redis_url, key_prefix):
    config = KvStoreConfig(heartbeat_timeout=0.6, key_prefix=key_prefix, snapshot_interval=0.0)

    def run(scenario):
        async def main():
            async with Harness(nats_url, redis_url, config) as h:
                return await scenario(h)

        return asyncio.run(main())

    return run


def test_events_in_matches_out(harness):
    async def scenario(h: Harness):
        await h.events("a", 0, reset=True)
        await h.events("a", 1, ("stored", 11), ("stored", 12), ("stored", 13))
        await h.events("b", 0, ("stored", 11), reset=True)
        first = await h.match([11, 12, 13, 14])
        await h.events("a", 2, ("evicted", 12))
        return first, await h.match([11, 12, 13]), await h.match([11, 12], ["b"])

    first, after_eviction, only_b = harness(scenario)
    assert first == {"a": 3, "b": 1}
    assert after_eviction == {"a": 1, "b": 1}
    assert only_b == {"b": 1}


def test_a_gap_in_seq_asks_that_instance_for_a_snapshot(harness):
    async def scenario(h: Harness):
        await h.events("a", 0, reset=True)
        await h.events("a", 1, ("stored", 1))
        await h.match([1])
        before = list(h.snapshot_requests)
        await h.events("a", 3, ("stored", 2))  # seq 2 was lost
        await h.match([1])
        return before, list(h.snapshot_requests)

    before, after = harness(scenario)
    assert before == []
    assert after == [KvSnapshotRequest(instance_id="a")]


def test_an_instance_that_stops_heartbeating_leaves_the_index(harness):
    async def scenario(h: Harness):
        await h.events("a", 0, ("stored", 1), reset=True)
        await h.events("b", 0, ("stored", 1), reset=True)
        both = await h.match([1])
        deadline = time.monotonic() + 1.5  # b keeps beating, a falls silent
        while time.monotonic() < deadline:
            await h.heartbeat("b")
            await asyncio.sleep(0.1)
        return both, await h.match([1])

    both, after = harness(scenario)
    assert both == {"a": 1, "b": 1}
    assert after == {"b": 1}


def test_a_restarted_kvstore_keeps_the_index_and_resyncs_live_instances(harness):
    async def scenario(h: Harness):
        await h.events("a", 0, ("stored", 1), ("stored", 2), reset=True)
        await h.heartbeat("a")
        await h.match([1])
        await h.stop_service()
        h.snapshot_requests.clear()
        await h.start_service()
        kept = await h.match([1, 2])
        await h.heartbeat("a")  # first heartbeat this process hears from a
        await h.match([1])
        return kept, list(h.snapshot_requests)

    kept, requests = harness(scenario)
    assert kept == {"a": 2}
    assert requests == [KvSnapshotRequest(instance_id="a")]


def test_a_malformed_message_is_dropped_and_the_service_keeps_serving(harness):
    async def scenario(h: Harness):
        await h.nc.publish(subjects.KV_EVENTS, b"\x93not msgpack of ours")
        await h.nc.publish(subjects.KV_MATCH, b"garbage")
        await h.events("a", 0, ("stored", 5), reset=True)
        return await h.match([5])

    assert harness(scenario) == {"a": 1}
