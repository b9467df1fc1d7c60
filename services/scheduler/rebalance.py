"""What the live scheduler and the simulator share beyond the policies: the SLO targets a
policy sees in each `PlacementRequest`, and one round of the role rebalancer.

`SchedulerService` and `services.scheduler.sim.simulator.Simulator` both call these, so the
simulator runs the live code path: the same `FlipConfig` from the same `SchedulerConfig`
options, the same `PlacementRequest` fields, and every `PLAN_INTERVAL` the same
`plan_role_flips` on a `Registry` snapshot followed by `Registry.note_role` for each flip.
Only the delivery differs: live, a `SetRoleCmd` over NATS; simulated, the instance's role.
"""

from __future__ import annotations

from services.scheduler.cluster import Registry
from services.scheduler.config import SchedulerConfig
from services.scheduler.policies import FlipConfig, PlacementRequest, plan_role_flips

PLAN_INTERVAL = 0.25
"""Seconds between role-flip plans (about one instance heartbeat)."""


def flip_config(config: SchedulerConfig) -> FlipConfig:
    """The rebalancer's options (and the SLO targets placements carry); 0 = no target."""
    return FlipConfig(
        slo_ttft=config.slo_ttft or None,
        slo_tpot=config.slo_tpot or None,
        min_decode_instances=config.min_decode_instances,
        cooldown=config.flip_cooldown,
        idle_seconds=config.flip_idle,
        admission_margin=config.slo_admission or None,
    )


def placement_request(
    *,
    request_id: str,
    num_prompt_tokens: int,
    max_tokens: int,
    model: str | None,
    priority: int,
    sequence_number: int,
    prefix_hits: dict[str, int],
    targets: FlipConfig,
) -> PlacementRequest:
    """What a policy sees of a request, with the SLO targets of `targets` (every policy gets
    them; slo-pd reads them)."""
    return PlacementRequest(
        request_id=request_id,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=max_tokens,
        model=model,
        priority=priority,
        sequence_number=sequence_number,
        prefix_hits=prefix_hits,
        slo_ttft=targets.slo_ttft,
        slo_tpot=targets.slo_tpot,
        admission_margin=targets.admission_margin,
    )


def rebalance(registry: Registry, now: float, config: FlipConfig) -> list[tuple[str, str]]:
    """One plan: the flips `plan_role_flips` orders on the registry's picture at `now`, each
    already noted in the registry (placed by at once); the caller delivers them."""
    flips = plan_role_flips(registry.snapshot(now), config)
    for instance_id, role in flips:
        registry.note_role(instance_id, role, now)
    return flips
