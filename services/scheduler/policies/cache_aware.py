"""Cache-aware placement (report §3.4): send a request where its prefix already lives,
unless that instance is too loaded.

The report's three steps, over the snapshot:
1. prefix matching — `PlacementRequest.prefix_hits`, filled by the scheduler from the
   kvstore's global index (and its own recent placements);
2. performance estimation — the work a new request waits for on each instance: the prefill
   it would need there after the hit, plus the tokens the instance already has queued or
   running (its load), both in tokens;
3. best node — the smallest estimate (ties: fewer sequences, then id, so it is stable).

Counting both in tokens makes the trade explicit: a hit of H tokens is worth H tokens of
someone else's queue. A long shared system prompt pulls requests together, but once the
holder's queue is longer than the prompt it saves, the next request goes elsewhere (and
warms that instance's cache too).
"""

from __future__ import annotations

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest


def cache_aware(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    candidates = snapshot.candidates(request.model, request.roles)
    if not candidates:
        return None
    return min(candidates, key=lambda v: _estimate(request, v)).instance_id


def _estimate(request: PlacementRequest, view: InstanceView) -> tuple[int, int, str]:
    work = request.uncached_tokens(view.instance_id) + view.load
    return work, view.num_requests, view.instance_id
