"""The cache-aware policy and the scheduler's short-term memory of placements."""

from __future__ import annotations

from services.scheduler.policies import PlacementRequest, get_policy
from services.scheduler.policies.cache_aware import cache_aware
from services.scheduler.policies.tier_cost import block_price, prefix_work
from services.scheduler.prefix import RecentPlacements
from tests.scheduler import beats
from tests.scheduler.test_policies import heartbeat, snapshot


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
