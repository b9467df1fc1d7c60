"""The role rebalancer, shared by the live scheduler and the simulator: its options (also the
SLO targets every `PlacementRequest` carries, see `placement.placement_request`) and one round.

`SchedulerService` and `services.scheduler.sim.simulator.Simulator` both call these, so the
simulator runs the live code path: the same `FlipConfig` from the same `SchedulerConfig`
options, and every `PLAN_INTERVAL` the same `plan_role_flips` on a `Registry` snapshot
followed by `Registry.note_role` for each flip.
Only the delivery differs: live, a `SetRoleCmd` over NATS; simulated, the instance's role.
"""

from __future__ import annotations

from services.scheduler.cluster import Registry
from services.scheduler.config import SchedulerConfig
from services.scheduler.policies import FlipConfig, plan_role_flips
from services.scheduler.policies.decode_limits import DecodeCost

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
        hysteresis=config.flip_hysteresis,
        admission_margin=config.slo_admission or None,
    )


def rebalance(
    registry: Registry, now: float, config: FlipConfig, cost: DecodeCost | None = None
) -> list[tuple[str, str]]:
    """One plan: the flips `plan_role_flips` orders on the registry's picture at `now` (`cost`
    predicting the decode pool's TPOT), each already noted in the registry (placed by at
    once); the caller delivers them."""
    flips = plan_role_flips(registry.snapshot(now), config, cost)
    for instance_id, role in flips:
        registry.note_role(instance_id, role, now)
    return flips
