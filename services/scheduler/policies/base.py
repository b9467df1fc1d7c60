"""What every placement policy sees: the request to place (`PlacementRequest`) and the
cluster (`ClusterSnapshot`), both immutable values."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.scheduler.cluster import ClusterSnapshot
from xllm.hardware import UNPROFILED_TIER_BANDWIDTH


@dataclass(frozen=True, slots=True)
class PlacementRequest:
    request_id: str
    num_prompt_tokens: int
    max_tokens: int
    model: str | None = None
    priority: int = 0
    sequence_number: int = 0
    """How many requests the scheduler placed before this one (round-robin's cursor)."""
    roles: tuple[str, ...] = ("both",)
    """Roles an instance must have to be a candidate: ("both",) for a colocated request;
    ("prefill",) or ("decode",) when the scheduler places the two halves of a
    disaggregated one (it asks the policy once per half)."""
    prefix_hits: Mapping[str, int] = field(default_factory=dict)
    """instance -> leading prompt tokens it already holds in its KV cache (from the kvstore
    and the scheduler's recent placements); instances holding none are left out."""
    prefix_tiers: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    """instance -> {tier: how many of its hit blocks are fastest in that tier} (device,
    host, disk, store), as far as the kvstore knows; empty = no tier information."""
    store_blocks: int = 0
    """Leading prompt blocks in the cluster store, which any instance can fetch."""
    tier_bandwidth: Mapping[str, float] = field(
        default_factory=lambda: dict(UNPROFILED_TIER_BANDWIDTH)
    )
    """Bytes/s into an instance's device pool from each tier, from the hardware profile
    (`--cost-profile`); what `tier_cost.prefix_work` prices loads with."""
    slo_ttft: float | None = None
    """Time-to-first-token target, seconds (None = none); the SLO-aware policy places the
    prefill half where it is predicted to be met. The scheduler fills it from its config."""
    slo_tpot: float | None = None
    """Time-per-output-token target, seconds (None = none); the SLO-aware policy prefers
    decode instances whose recent TPOT meets it."""
    admission_margin: float | None = None
    """SLO admission (`policies.admission`): refuse this request, if online, when its best
    predicted TTFT is past this × `slo_ttft`; None = admit it whatever the prediction."""

    def uncached_tokens(self, instance_id: str) -> int:
        """Prompt tokens `instance_id` would have to prefill. At least one: the engine always
        recomputes the last prompt token to get the first output's logits."""
        hit = self.prefix_hits.get(instance_id, 0)
        return max(1, self.num_prompt_tokens - hit)


Policy = Callable[[PlacementRequest, ClusterSnapshot], str | None]
"""A placement policy: the id of the instance to run the request on, or None if none can."""
