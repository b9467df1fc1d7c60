"""Placement policies and the registry, as pure functions over cluster snapshots."""

from __future__ import annotations

import pytest

from services.scheduler.cluster import ClusterSnapshot, InstanceView, Registry
from services.scheduler.policies import PlacementRequest, get_policy, least_load, round_robin
from tests.scheduler import beats
from xllm.protocol import Heartbeat


def heartbeat(
    instance_id: str, tokens: int = 0, running: int = 0, role: str = "both", model: str = "m"
) -> Heartbeat:
    return beats.heartbeat(
        instance_id, role, model=model, num_tokens_in_flight=tokens, num_running=running
    )


def snapshot(*beats: Heartbeat) -> ClusterSnapshot:
    return ClusterSnapshot(tuple(InstanceView(b, 0.0) for b in beats))


def request(n: int = 0, model: str | None = None) -> PlacementRequest:
    return PlacementRequest(
        request_id=f"r{n}", num_prompt_tokens=10, max_tokens=10, model=model, sequence_number=n
    )


def test_round_robin_cycles_through_instances_in_id_order():
    snap = snapshot(heartbeat("b"), heartbeat("a"), heartbeat("c"))
    assert [round_robin(request(i), snap) for i in range(4)] == ["a", "b", "c", "a"]


def test_least_load_takes_the_fewest_tokens_then_fewest_requests():
    snap = snapshot(
        heartbeat("a", tokens=500),
        heartbeat("b", tokens=100, running=3),
        heartbeat("c", tokens=100, running=1),
    )
    assert least_load(request(), snap) == "c"


def test_policies_only_pick_instances_serving_the_model_in_a_serving_role():
    snap = snapshot(heartbeat("a", model="other"), heartbeat("b", role="prefill"), heartbeat("c"))
    for policy in (round_robin, least_load):
        assert policy(request(model="m"), snap) == "c"
        assert policy(request(model="nobody"), snap) is None
    assert least_load(request(), ClusterSnapshot()) is None


def test_placements_since_the_last_heartbeat_count_as_load():
    registry = Registry(timeout=2.0)
    registry.update(heartbeat("a"), now=0.0)
    registry.update(heartbeat("b"), now=0.0)
    chosen = []
    for i in range(4):  # a burst between heartbeats spreads instead of piling on one
        target = least_load(request(i), registry.snapshot())
        registry.note_placement(target, 20)
        chosen.append(target)
    assert sorted(chosen) == ["a", "a", "b", "b"]
    registry.update(heartbeat("a", tokens=7), now=1.0)  # a fresh heartbeat replaces the estimate
    assert next(v for v in registry.snapshot().instances if v.instance_id == "a").load == 7


def test_registry_drops_silent_instances():
    registry = Registry(timeout=2.0)
    assert registry.update(heartbeat("a"), now=0.0)
    assert not registry.update(heartbeat("a"), now=1.0)
    registry.update(heartbeat("b"), now=2.5)
    assert [v.instance_id for v in registry.expire(now=3.5)] == ["a"]
    assert "a" not in registry and "b" in registry


def test_registry_tells_a_restarted_instance_from_a_live_one():
    registry = Registry(timeout=2.0)
    registry.update(beats.heartbeat("a", started_at=100.0), now=0.0)
    assert registry.restarted(beats.heartbeat("a", started_at=100.0)) is None
    assert registry.restarted(beats.heartbeat("b", started_at=300.0)) is None  # new, not restarted
    assert registry.restarted(beats.heartbeat("a", started_at=200.0)) == 100.0
    registry.forget("a")
    assert "a" not in registry


def test_unknown_policy_names_the_known_ones():
    with pytest.raises(ValueError, match="round-robin, least-load"):
        get_policy("magic")
