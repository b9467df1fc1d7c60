"""Placement policies: pure functions `(request, snapshot) -> instance id | None`.

A policy sees only a `PlacementRequest` and an immutable `ClusterSnapshot`, never the
scheduler's mutable state, so the live scheduler and the simulator run the same code.
`None` means no instance can take the request.
"""

from __future__ import annotations

from services.scheduler.cluster import ClusterSnapshot
from services.scheduler.policies.base import PlacementRequest, Policy
from services.scheduler.policies.cache_aware import cache_aware

__all__ = ["POLICIES", "PlacementRequest", "Policy", "get_policy"]


def round_robin(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    """Each instance in turn, by the request's sequence number."""
    candidates = snapshot.candidates(request.model, request.roles)
    if not candidates:
        return None
    return candidates[request.sequence_number % len(candidates)].instance_id


def least_load(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    """The instance with the fewest tokens queued or running (ties: fewest sequences, then id)."""
    candidates = snapshot.candidates(request.model, request.roles)
    if not candidates:
        return None
    best = min(
        candidates,
        key=lambda v: (v.load, v.num_requests, v.instance_id),
    )
    return best.instance_id


POLICIES: dict[str, Policy] = {
    "round-robin": round_robin,
    "least-load": least_load,
    "cache-aware": cache_aware,
}

POLICIES_USING_PREFIX_HITS = frozenset({"cache-aware"})
"""Policies that read `PlacementRequest.prefix_hits`: only for them does the scheduler ask
the kvstore (a NATS round trip per request)."""


def get_policy(name: str) -> Policy:
    try:
        return POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {', '.join(POLICIES)}") from None
