"""Cache-aware placement (report §3.4): send a request where its prefix already lives,
unless that instance is too loaded.

The report's three steps, over the snapshot:
1. prefix matching — `PlacementRequest.prefix_hits`, filled by the scheduler from the
   kvstore's global index (and its own recent placements);
2. performance estimation — the work a new request waits for on each instance: the prefill
   it would need there after the hit, plus the tokens the instance already has queued or
   running (its load), both in tokens;
3. best node — the smallest estimate (ties: fewer sequences, then id, so it is stable).

With the KV tiers, a hit is priced by where its blocks are (`tier_cost.prefix_work`): on
the device free, in host memory, on disk or in the cluster store at its load time, in
tokens of that instance's prefill; blocks any instance can fetch from the store count for
every candidate. Counting both in tokens makes the trade explicit: a hit of H tokens is worth H tokens of
someone else's queue. A long shared system prompt pulls requests together, but once the
holder's queue is longer than the prompt it saves, the next request goes elsewhere (and
warms that instance's cache too).
"""

from __future__ import annotations

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest
from services.scheduler.policies.tier_cost import prefix_work


def cache_aware(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    candidates = snapshot.candidates(request.model, request.roles)
    if not candidates:
        return None
    return min(candidates, key=lambda v: _estimate(request, v)).instance_id


def _estimate(request: PlacementRequest, view: InstanceView) -> tuple[float, int, str]:
    if request.prefix_tiers or request.store_blocks:  # price each hit by where it is
        tiers = request.prefix_tiers.get(view.instance_id, {})
        block_size = view.heartbeat.kv_block_size
        store = request.store_blocks
        prefix = prefix_work(
            request.num_prompt_tokens, block_size, tiers, store, view.heartbeat,
            request.tier_bandwidth,
        )  # fmt: skip
    else:
        prefix = request.uncached_tokens(view.instance_id)
    return prefix + view.load, view.num_requests, view.instance_id
