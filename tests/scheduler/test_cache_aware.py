"""The cache-aware policy and the scheduler's short-term memory of placements."""

from __future__ import annotations

from services.scheduler.policies import PlacementRequest, get_policy
from services.scheduler.policies.cache_aware import cache_aware
from services.scheduler.prefix import RecentPlacements
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
