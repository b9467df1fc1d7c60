"""Transfer-cost-aware prefix pricing (report §3.4): what it costs an instance to have a
request's prompt KV, by where the prefix's blocks are.

One pure function, in prompt tokens of prefill work (the unit cache-aware placement adds to
an instance's queue):

    blocks on its device            × 0
  + blocks in its host / disk tiers × their load time
  + blocks it would fetch from the cluster store × the fetch time
  + tokens it must recompute        × 1

The bandwidths are the instances' hardware profile's (`HardwareProfile.tier_bandwidth`:
host and disk reads, the link to the store or a peer), carried by the request
(`PlacementRequest.tier_bandwidth`), so the live scheduler and `xllm sim` price alike.
A load time is priced in tokens by the instance's own measured prefill speed: loading a
block of `kv_block_bytes` at the tier's bandwidth takes as long as prefilling (load seconds
/ prefill seconds per token) tokens. Before an instance has measured its prefill speed,
each tier costs a fixed share of recomputing the block (`UNMEASURED_SHARE`).
"""

from __future__ import annotations

from collections.abc import Mapping

from xllm.hardware import UNPROFILED_TIER_BANDWIDTH
from xllm.protocol import Heartbeat

UNMEASURED_SHARE = {"device": 0.0, "host": 0.02, "disk": 0.2, "store": 0.2}
"""A block's load as a share of its recompute, while an instance has no prefill measurement."""


def prefix_work(
    num_prompt_tokens: int,
    block_size: int,
    tiers: Mapping[str, int],
    store_blocks: int,
    heartbeat: Heartbeat | None = None,
    bandwidth: Mapping[str, float] = UNPROFILED_TIER_BANDWIDTH,
) -> float:
    """Tokens of prefill work equivalent to getting this prompt's KV on one instance.

    `tiers`: how many of the prompt's leading blocks the instance holds, by the fastest
    tier holding each; `store_blocks`: leading blocks the cluster store holds (fetched for
    those past the instance's own). At least one token is always recomputed (the engine
    recomputes the last prompt token for its logits)."""
    local = sum(tiers.values())
    fetched = max(0, min(store_blocks, (num_prompt_tokens - 1) // block_size) - local)
    loads = dict(tiers)
    loads["store"] = loads.get("store", 0) + fetched
    recompute = max(1, num_prompt_tokens - (local + fetched) * block_size)
    return recompute + sum(
        n * block_price(t, block_size, heartbeat, bandwidth) for t, n in loads.items()
    )


def block_price(
    tier: str,
    block_size: int,
    heartbeat: Heartbeat | None,
    bandwidth: Mapping[str, float] = UNPROFILED_TIER_BANDWIDTH,
) -> float:
    """Loading one block from `tier`, in tokens of prefill work (never more than its
    recompute: the instance recomputes instead when loading costs more)."""
    per_token = heartbeat.steps.recent_prefill_seconds_per_token if heartbeat else 0.0
    block_bytes = heartbeat.kv_block_bytes if heartbeat else 0
    if per_token <= 0 or block_bytes <= 0:
        return UNMEASURED_SHARE.get(tier, 1.0) * block_size
    return min(block_size, block_bytes / bandwidth.get(tier, 1e9) / per_token)
