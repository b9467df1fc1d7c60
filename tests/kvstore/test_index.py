"""KvIndex against a real Valkey: events in, prefix matches out."""

from __future__ import annotations

import asyncio

import pytest
from redis.asyncio import Redis

from services.kvstore.index import KvIndex
from xllm.protocol import KvEvent


def stored(*hashes: int, tier: str = "device") -> list[KvEvent]:
    return [KvEvent("stored", h, tier) for h in hashes]


def evicted(*hashes: int, tier: str = "device") -> list[KvEvent]:
    return [KvEvent("evicted", h, tier) for h in hashes]


@pytest.fixture
def run(redis_url, key_prefix):
    """`run(coro_fn)`: call `coro_fn(index)` on a fresh index, in its own event loop."""

    def runner(fn):
        async def main():
            redis = Redis.from_url(redis_url)
            try:
                return await fn(KvIndex(redis, key_prefix))
            finally:
                await redis.aclose()

        return asyncio.run(main())

    return runner


def test_match_is_the_longest_held_prefix_per_instance(run):
    async def scenario(index: KvIndex):
        await index.apply("a", stored(1, 2, 3, 4), seq=0)
        await index.apply("b", stored(1, 2), seq=0)
        await index.apply("c", stored(2, 3, 4), seq=0)  # not block 0: no prefix at all
        return (
            await index.match([1, 2, 3, 4, 5]),
            await index.match([1, 9, 3]),
            await index.match([7, 1]),
            await index.match([1, 2, 3], instance_ids=["b"]),
        )

    full, diverging, miss, only_b = run(scenario)
    assert full == {"a": 4, "b": 2}
    assert diverging == {"a": 1, "b": 1}
    assert miss == {}
    assert only_b == {"b": 2}


def test_eviction_cuts_the_prefix_at_the_first_missing_block(run):
    async def scenario(index: KvIndex):
        await index.apply("a", stored(1, 2, 3), seq=0)
        applied = await index.apply("a", evicted(2), seq=1)
        return applied, await index.match([1, 2, 3]), await index.blocks("a")

    applied, matched, blocks = run(scenario)
    assert applied.num_blocks == 2 and applied.prev_seq == 0
    assert matched == {"a": 1}
    assert blocks == {1, 3}


def test_a_block_moved_to_another_tier_stays_held(run):
    async def scenario(index: KvIndex):
        await index.apply("a", stored(1, 2), seq=0)
        # offload block 2: stored on host, then evicted from device (in that order)
        await index.apply("a", stored(2, tier="host") + evicted(2), seq=1)
        moved = await index.match([1, 2])
        await index.apply("a", evicted(2, tier="host"), seq=2)
        return moved, await index.match([1, 2])

    moved, gone = run(scenario)
    assert moved == {"a": 2}
    assert gone == {"a": 1}


def test_reset_replaces_what_an_instance_held(run):
    async def scenario(index: KvIndex):
        await index.apply("a", stored(1, 2, 3), seq=5)
        await index.apply("b", stored(1, 2, 3), seq=0)
        applied = await index.apply("a", stored(1), seq=0, reset=True)
        return applied, await index.match([1, 2, 3])

    applied, matched = run(scenario)
    assert applied.num_blocks == 1 and applied.prev_seq == 5
    assert matched == {"a": 1, "b": 3}


def test_dropping_an_instance_removes_all_its_entries(run):
    async def scenario(index: KvIndex):
        await index.apply("a", stored(1, 2), seq=0)
        await index.apply("b", stored(1), seq=0)
        dropped = await index.drop_instance("a")
        again = await index.drop_instance("a")
        return dropped, again, await index.match([1, 2]), await index.instances()

    dropped, again, matched, instances = run(scenario)
    assert dropped and not again
    assert matched == {"b": 1}
    assert instances == {"b"}


def test_first_message_has_no_previous_seq(run):
    async def scenario(index: KvIndex):
        first = await index.apply("a", stored(1), seq=0)
        return first, await index.last_seq("a"), await index.last_seq("nobody")

    first, last, unknown = run(scenario)
    assert first.prev_seq is None and last == 0 and unknown is None


def test_every_tier_of_a_block_is_recorded(run):
    async def scenario(index: KvIndex):
        # write-through: on device and in host; then the device copy goes, then host's
        # (spilled to disk first).
        await index.apply("a", stored(1, 2) + stored(1, 2, tier="host"), seq=0)
        both = await index.tiers_of(2), await index.match_tiers([1, 2])
        await index.apply("a", evicted(2), seq=1)
        host_only = await index.tiers_of(2), await index.match_tiers([1, 2])
        await index.apply("a", stored(2, tier="disk") + evicted(2, tier="host"), seq=2)
        disk_only = await index.tiers_of(2), await index.match_tiers([1, 2])
        await index.apply("a", evicted(2, tier="disk"), seq=3)
        return both, host_only, disk_only, await index.match([1, 2]), await index.blocks("a")

    both, host_only, disk_only, gone, blocks = run(scenario)
    assert both == ({"a": {"device", "host"}}, ({"a": 2}, {"a": {"device": 2}}, 0))
    assert host_only == ({"a": {"host"}}, ({"a": 2}, {"a": {"device": 1, "host": 1}}, 0))
    assert disk_only == ({"a": {"disk"}}, ({"a": 2}, {"a": {"device": 1, "disk": 1}}, 0))
    assert gone == {"a": 1} and blocks == {1}


def test_match_by_tier_counts_each_instance_on_its_own(run):
    async def scenario(index: KvIndex):
        await index.apply("a", stored(1, 2, 3, tier="host") + stored(1), seq=0)
        await index.apply("b", stored(1, 2, tier="store") + stored(1, 2), seq=0)
        await index.apply("c", stored(1, 2, 3, 4, tier="disk") + stored(4, tier="store"), seq=0)
        return await index.match_tiers([1, 2, 3, 4]), await index.match_tiers([1], ["b"])

    (matched, by_tier, store_blocks), only_b = run(scenario)
    assert matched == {"a": 3, "b": 2, "c": 4}
    assert by_tier == {"a": {"device": 1, "host": 2}, "b": {"device": 2}, "c": {"disk": 4}}
    assert store_blocks == 2  # b put blocks 1 and 2; c's block 4 does not extend the run
    assert only_b == ({"b": 1}, {"b": {"device": 1}}, 1)
