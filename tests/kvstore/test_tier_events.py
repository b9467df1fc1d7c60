"""An instance's KV events name the tier of every copy: the engine's device pool, and the host
and disk tiers behind it (real nats-server, Valkey and kvstore index; engine blocks moved by
hand, as its steps would move them)."""

from __future__ import annotations

import asyncio

import nats
import torch
from redis.asyncio import Redis

from services.kvstore.index import KvIndex
from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_cache import KVCache
from xllm.engine.kv_tiers import KvTiers
from xllm.engine.prefix_hash import block_hashes
from xllm.engine.sequence import Sequence
from xllm.instance.kv_events import KvEventPublisher
from xllm.protocol import KvEvents, decode_as, subjects
from xllm.protocol.types import SamplingParams

BLOCK = 2


def compute(bm: BlockManager, tiers: KvTiers, request_id: str, prompt: list[int]) -> Sequence:
    seq = Sequence(request_id, prompt, SamplingParams())
    assert bm.allocate(seq, len(prompt), bm.find_cached_prefix(seq))
    seq.num_computed_tokens = len(prompt)
    bm.cache_full_blocks(seq)
    tiers.write_through()
    bm.free(seq)
    return seq


async def test_device_host_and_disk_copies_reach_the_index(
    nats_url, redis_url, key_prefix, tmp_path
):
    kv = KVCache(1, 4, BLOCK, 1, 1, torch.float32, torch.device("cpu"))
    bm = BlockManager(4, BLOCK)
    tiers = KvTiers(kv, bm, num_host_blocks=4, disk_dir=str(tmp_path), num_disk_blocks=8)
    nc = await nats.connect(nats_url)
    redis = Redis.from_url(redis_url)
    index = KvIndex(redis, key_prefix)
    received: asyncio.Queue[KvEvents] = asyncio.Queue()

    async def on_events(msg) -> None:
        await received.put(decode_as(msg.data, KvEvents))

    await nc.subscribe(subjects.KV_EVENTS, cb=on_events)
    publisher = KvEventPublisher(nc, "inst-a")

    async def publish() -> None:
        await publisher.flush()
        await nc.flush()
        msg = await asyncio.wait_for(received.get(), 5)
        await index.apply(msg.instance_id, msg.events, msg.seq, msg.reset)

    try:
        first = [1, 2, 3, 4, 5]  # two full blocks (the last token is never cached)
        compute(bm, tiers, "a", first)
        publisher.collect(bm, tiers)
        await publish()
        chain = block_hashes(first, BLOCK)
        assert await index.tiers_of(chain[0]) == {"inst-a": {"device", "host"}}

        # Four more blocks push the first prompt's out of the device pool, then out of host
        # memory, which spills them to disk.
        compute(bm, tiers, "b", [7, 8, 9, 10, 11])
        compute(bm, tiers, "c", [12, 13, 14, 15, 16])
        publisher.collect(bm, tiers)
        await publish()
        assert await index.tiers_of(chain[0]) == {"inst-a": {"disk"}}
        match = await index.match_tiers(chain)
        assert match.matched == {"inst-a": 2} and match.by_tier == {"inst-a": {"disk": 2}}

        # A snapshot re-sends every copy, device, host and disk.
        copies = await publisher.snapshot(bm, tiers)
        await nc.flush()
        msg = await asyncio.wait_for(received.get(), 5)
        held = len(bm.cached_blocks) + len(tiers.host.index) + len(tiers.disk)
        assert msg.reset and copies == len(msg.events) == held
        assert {e.tier for e in msg.events} == {"device", "host", "disk"}
    finally:
        tiers.close()
        await nc.close()
        await redis.aclose()
