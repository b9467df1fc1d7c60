"""The cache-aware policy and the scheduler's short-term memory of placements."""

from __future__ import annotations

import dataclasses

import pytest

from services.scheduler.policies import PlacementRequest, get_policy
from services.scheduler.policies.cache_aware import cache_aware
from services.scheduler.policies.tier_cost import block_price, prefix_work
from services.scheduler.prefix import RecentPlacements
from tests.scheduler import beats
from tests.scheduler.test_policies import heartbeat, snapshot
from xllm.hardware import SPEC_PROFILES


def placement(prompt: int, hits: dict[str, int], model: str | None = None) -> PlacementRequest:
    return PlacementRequest(
        request_id="r", num_prompt_tokens=prompt, max_tokens=16, model=model, prefix_hits=hits
    )


def test_goes_where_the_prefix_lives_when_loads_are_equal():
    snap = snapshot(heartbeat("a"), heartbeat("b"), heartbeat("c"))
    assert cache_aware(placement(1000, {"b": 960, "c": 480}), snap) == "b"


def test_without_hits_it_is_least_load():
    snap = snapshot(heartbeat("a", tokens=300), heartbeat("b", tokens=100))
    assert cache_aware(placement(1000, {}), snap) == "b"


def test_a_hit_is_worth_its_tokens_of_someone_elses_queue():
    # b holds 900 of 1000 tokens: it saves 900 tokens of prefill, so it wins until its
    # queue is 900 tokens longer than a's.
    hits = {"b": 900}
    assert cache_aware(placement(1000, hits), snapshot(heartbeat("a"), heartbeat("b", 899))) == "b"
    assert cache_aware(placement(1000, hits), snapshot(heartbeat("a"), heartbeat("b", 901))) == "a"


def test_a_full_hit_still_costs_one_token():
    request = placement(32, {"a": 32})
    assert request.uncached_tokens("a") == 1 and request.uncached_tokens("b") == 32


def test_only_instances_serving_the_model_and_none_when_there_are_none():
    snap = snapshot(heartbeat("a", model="x"), heartbeat("b", model="y"))
    assert cache_aware(placement(100, {"a": 96}, model="y"), snap) == "b"
    assert cache_aware(placement(100, {}, model="z"), snap) is None


def test_selectable_by_name():
    assert get_policy("cache-aware") is cache_aware


def test_recent_placements_match_the_common_prefix_and_expire():
    recent = RecentPlacements(ttl=5.0)
    recent.add([1, 2, 3], "a", now=0.0)
    recent.add([1, 2, 9], "b", now=1.0)
    assert recent.match([1, 2, 3, 4], now=2.0) == {"a": 3, "b": 2}
    assert recent.match([7], now=2.0) == {}
    assert recent.match([1, 2, 3], now=5.5) == {"b": 2}  # a's entries (t=0) expired
    assert recent.match([1, 2, 3], now=7.0) == {}


def test_recent_placements_forget_the_oldest_beyond_capacity():
    recent = RecentPlacements(ttl=100.0, capacity=2)
    recent.add([1, 2, 3], "a", now=0.0)
    assert recent.match([2], now=0.0) == {"a": 1} and recent.match([1], now=0.0) == {}


def tiered(prompt: int, tiers: dict[str, dict[str, int]], store: int = 0) -> PlacementRequest:
    hits = {i: 16 * sum(t.values()) for i, t in tiers.items()}
    return PlacementRequest(
        request_id="r",
        num_prompt_tokens=prompt,
        max_tokens=16,
        prefix_hits=hits,
        prefix_tiers=tiers,
        store_blocks=store,
    )


def test_a_prefix_is_priced_by_the_tier_it_is_in():
    # 640 prompt tokens = 40 blocks of 16; unmeasured instances: host 2%, disk and store 20%
    # of a block's recompute.
    assert prefix_work(640, 16, {"device": 39}, 0) == 16
    assert prefix_work(640, 16, {"host": 39}, 0) == 16 + 39 * 16 * 0.02
    assert prefix_work(640, 16, {"disk": 39}, 0) == 16 + 39 * 16 * 0.2
    # Nothing local, 39 blocks in the store: fetched at the store's price.
    assert prefix_work(640, 16, {}, 39) == prefix_work(640, 16, {"disk": 39}, 0)
    assert prefix_work(640, 16, {}, 0) == 640
    # Measured: a 64 KiB block over host memory (10 GB/s) vs 1 ms of prefill per token.
    beat = beats.heartbeat("a", kv_block_bytes=65536, recent_prefill_seconds_per_token=1e-3)
    assert abs(block_price("host", 16, beat) - 65536 / 10e9 / 1e-3) < 1e-12
    slow = beats.heartbeat("a", kv_block_bytes=1 << 30, recent_prefill_seconds_per_token=1e-6)
    assert block_price("disk", 16, slow) == 16  # never more than recomputing


def test_cache_aware_prefers_the_faster_tier_then_the_store_over_nothing():
    snap = snapshot(heartbeat("a"), heartbeat("b"), heartbeat("c"))
    request = tiered(640, {"a": {"disk": 39}, "b": {"device": 30, "host": 9}})
    assert cache_aware(request, snap) == "b"
    # Only c is idle; a and b queue work. With the prefix in the store, c fetches it and
    # wins; without, a's disk copy beats recomputing 640 tokens on c.
    busy = snapshot(heartbeat("a", tokens=200), heartbeat("b", tokens=2000), heartbeat("c"))
    assert cache_aware(tiered(640, {"a": {"disk": 39}}, store=39), busy) == "c"
    assert cache_aware(tiered(640, {"a": {"disk": 39}}, store=0), busy) == "a"


def test_a_profile_prices_each_tier_by_its_bandwidth():
    # a100: host over PCIe (25 GB/s), disk 6 GB/s, the store over the 25 GB/s link. 1 MiB
    # blocks of 16 tokens, measured prefill 2 ms a token (32 ms a block).
    bw = SPEC_PROFILES["a100"].tier_bandwidth()
    beat = beats.heartbeat("a", kv_block_bytes=1 << 20, recent_prefill_seconds_per_token=2e-3)
    host = (1 << 20) / 25e9 / 2e-3
    disk = (1 << 20) / 6e9 / 2e-3
    assert prefix_work(640, 16, {"device": 39}, 0, beat, bw) == 16  # device: free
    assert prefix_work(640, 16, {"host": 39}, 0, beat, bw) == pytest.approx(16 + 39 * host)
    assert prefix_work(640, 16, {"disk": 39}, 0, beat, bw) == pytest.approx(16 + 39 * disk)
    # From the store at the link's cost: 9 blocks past the 30 the device holds.
    store = prefix_work(640, 16, {"device": 30}, 39, beat, bw)
    assert store == pytest.approx(16 + 9 * (1 << 20) / bw["store"] / 2e-3)
    assert prefix_work(640, 16, {}, 0, beat, bw) == 640  # recompute: every token
    # A slower link makes the store dearer, nothing else.
    slow = dataclasses.replace(SPEC_PROFILES["a100"], interconnect_bw=1e9).tier_bandwidth()
    assert prefix_work(640, 16, {"device": 30}, 39, beat, slow) > store
    assert prefix_work(640, 16, {"host": 39}, 0, beat, slow) == pytest.approx(16 + 39 * host)


def test_cache_aware_adds_the_queue_and_uses_the_requests_bandwidths():
    # b holds the prefix on disk and queues 50 tokens more than c, which holds nothing.
    # On a fast disk b wins; on a disk slower than recomputing, the load is priced as the
    # recompute (never more), and c's shorter queue wins.
    measured = dict(kv_block_bytes=1 << 20, recent_prefill_seconds_per_token=2e-3)
    snap = snapshot(
        beats.heartbeat("b", num_tokens_in_flight=150, **measured),
        beats.heartbeat("c", num_tokens_in_flight=100, **measured),
    )
    fast = dataclasses.replace(tiered(640, {"b": {"disk": 39}}), tier_bandwidth={"disk": 6e9})
    assert cache_aware(fast, snap) == "b"
    slow = dataclasses.replace(fast, tier_bandwidth={"disk": 1e6})
    assert cache_aware(slow, snap) == "c"
    queued = snapshot(
        beats.heartbeat("b", num_tokens_in_flight=800, **measured),
        beats.heartbeat("c", num_tokens_in_flight=100, **measured),
    )
    assert cache_aware(fast, queued) == "c"  # 700 tokens more queue than b saves
