"""The scheduler's picture of the cluster, rebuilt from heartbeats.

`Registry` is the only mutable part: it records each instance's latest heartbeat and when
it arrived, and drops instances that fell silent. Policies never see it: they get a
`ClusterSnapshot`, an immutable value, so the live scheduler and the simulator can hand
them the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from xllm.protocol import Heartbeat


@dataclass(frozen=True, slots=True)
class InstanceView:
    heartbeat: Heartbeat
    last_seen: float
    """Monotonic time the latest heartbeat arrived (the scheduler's clock, not the sender's)."""
    pending_tokens: int = 0
    pending_requests: int = 0
    """Work placed here since that heartbeat: without it, every request of a burst would
    see the same stale load and land on the same instance."""

    @property
    def instance_id(self) -> str:
        return self.heartbeat.instance_id

    @property
    def load(self) -> int:
        """Queued work in tokens: what a new request waits behind."""
        return self.heartbeat.num_tokens_in_flight + self.pending_tokens

    @property
    def num_requests(self) -> int:
        return self.heartbeat.num_running + self.heartbeat.num_waiting + self.pending_requests


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    instances: tuple[InstanceView, ...] = ()

    def view(self, instance_id: str) -> InstanceView:
        return next(v for v in self.instances if v.instance_id == instance_id)

    def candidates(
        self, model: str | None, roles: tuple[str, ...] = ("both",)
    ) -> list[InstanceView]:
        """Instances serving `model` (any, if None) in one of `roles`, in id order."""
        return sorted(
            (
                v
                for v in self.instances
                if v.heartbeat.role in roles and (model is None or v.heartbeat.model == model)
            ),
            key=lambda v: v.instance_id,
        )


class Registry:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self._views: dict[str, InstanceView] = {}

    def update(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if the instance is new to the registry."""
        is_new = heartbeat.instance_id not in self._views
        self._views[heartbeat.instance_id] = InstanceView(heartbeat, now)
        return is_new

    def note_placement(self, instance_id: str, num_tokens: int) -> None:
        view = self._views.get(instance_id)
        if view is not None:
            self._views[instance_id] = replace(
                view,
                pending_tokens=view.pending_tokens + num_tokens,
                pending_requests=view.pending_requests + 1,
            )

    def expire(self, now: float) -> list[str]:
        """Drop instances silent for longer than the timeout; returns their ids."""
        dead = [i for i, v in self._views.items() if now - v.last_seen > self.timeout]
        for instance_id in dead:
            del self._views[instance_id]
        return dead

    def snapshot(self) -> ClusterSnapshot:
        return ClusterSnapshot(tuple(self._views.values()))

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._views
