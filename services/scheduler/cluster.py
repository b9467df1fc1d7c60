"""The scheduler's picture of the cluster, rebuilt from heartbeats.

`Registry` is the only mutable part: it records each instance's latest heartbeat and when
it arrived, and drops instances that fell silent. Policies never see it: they get a
`ClusterSnapshot`, an immutable value, so the live scheduler and the simulator can hand
them the same thing.

The registry also keeps a little history that pure functions cannot rebuild from one
heartbeat (for the SLO-aware PD policy's role flips, report §3.2): since when each instance
has had its role, since when its prefill queue has been empty, the role it started in, and a
role the scheduler has ordered but the instance's heartbeats do not show yet. All times are
the caller's clock (`now` of `update`), which the snapshot carries too.
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
    pending_offline_tokens: int = 0
    """Of `pending_tokens`, those of offline requests (online prompts go before them)."""
    pending_output_tokens: int = 0
    """Of `pending_tokens`, online outputs to decode here, not prompt tokens to prefill."""
    started_as: str = ""
    """The role of the instance's first heartbeat (its home pool); "" = unknown."""
    role_since: float = 0.0
    """When the instance took its current `role` (first seen, or the flip was ordered)."""
    idle_since: float | None = None
    """Since when its heartbeats have shown no prefill backlog; None = it has one now."""
    pending_role: str | None = None
    """A role the scheduler ordered (`SetRoleCmd`) that the heartbeats do not show yet."""

    @property
    def instance_id(self) -> str:
        return self.heartbeat.instance_id

    @property
    def role(self) -> str:
        """The role to place by: an ordered flip counts at once, so no new work of the old
        role goes to an instance that is leaving it."""
        return self.pending_role or self.heartbeat.role

    @property
    def load(self) -> int:
        """Queued work in tokens: what a new request waits behind."""
        return self.heartbeat.load.num_tokens_in_flight + self.pending_tokens

    @property
    def num_requests(self) -> int:
        return (
            self.heartbeat.load.num_running
            + self.heartbeat.load.num_waiting
            + self.pending_requests
        )


@dataclass(frozen=True, slots=True)
class ClusterSnapshot:
    instances: tuple[InstanceView, ...] = ()
    now: float = 0.0
    """When the snapshot was taken, on the clock of `InstanceView.last_seen`."""

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
                if v.role in roles and (model is None or v.heartbeat.model == model)
            ),
            key=lambda v: v.instance_id,
        )


PENDING_ROLE_TIMEOUT = 5.0
"""Seconds an ordered role may go unconfirmed by heartbeats before it is forgotten (the
`SetRoleCmd` was lost, or the instance restarted): then the planner may order it again."""


class Registry:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self._views: dict[str, InstanceView] = {}
        self._now = 0.0
        self._dead_runs: dict[str, float] = {}
        """instance id -> `started_at` of its last run reported exited (one per id: a later
        run replaces it, so this stays as small as the set of ids)."""

    def update(self, heartbeat: Heartbeat, now: float) -> bool:
        """Record a heartbeat; True if the instance is new to the registry."""
        self._now = max(self._now, now)
        prev = self._views.get(heartbeat.instance_id)
        load = heartbeat.load
        idle = load.num_prefill_backlog_tokens == 0 and load.num_waiting == 0
        if prev is None:
            role = heartbeat.role
            self._views[heartbeat.instance_id] = InstanceView(
                heartbeat, now, started_as=role, role_since=now, idle_since=now if idle else None
            )
            return True
        pending = prev.pending_role
        if pending == heartbeat.role or now - prev.role_since > PENDING_ROLE_TIMEOUT:
            pending = None
        view = InstanceView(
            heartbeat,
            now,
            started_as=prev.started_as,
            role_since=prev.role_since,
            idle_since=(prev.idle_since if prev.idle_since is not None else now) if idle else None,
            pending_role=pending,
        )
        if view.role != prev.role:  # the instance changed role on its own (or restarted)
            view = replace(view, role_since=now)
        self._views[heartbeat.instance_id] = view
        return False

    def note_role(self, instance_id: str, role: str, now: float) -> None:
        """The scheduler ordered `instance_id` to take `role`: place by it from now on."""
        view = self._views.get(instance_id)
        if view is not None and view.role != role:
            self._views[instance_id] = replace(view, pending_role=role, role_since=now)

    def note_placement(
        self, instance_id: str, num_tokens: int, offline: bool = False, num_outputs: int = 0
    ) -> None:
        """`num_tokens` of work placed on `instance_id`, `num_outputs` of them outputs."""
        view = self._views.get(instance_id)
        if view is not None:
            self._views[instance_id] = replace(
                view,
                pending_tokens=view.pending_tokens + num_tokens,
                pending_offline_tokens=view.pending_offline_tokens + (num_tokens if offline else 0),
                pending_output_tokens=view.pending_output_tokens + (0 if offline else num_outputs),
                pending_requests=view.pending_requests + 1,
            )

    def expire(self, now: float) -> list[InstanceView]:
        """Drop instances silent for longer than the timeout; returns their last views."""
        self._now = max(self._now, now)
        dead = [v for v in self._views.values() if now - v.last_seen > self.timeout]
        for view in dead:
            del self._views[view.instance_id]
        return dead

    def restarted(self, heartbeat: Heartbeat) -> float | None:
        """The earlier run's `started_at` if `heartbeat` comes from a new run of a known
        instance id (it restarted faster than the heartbeat timeout), else None."""
        prev = self._views.get(heartbeat.instance_id)
        if prev is None or not heartbeat.started_at or not prev.heartbeat.started_at:
            return None
        if prev.heartbeat.started_at == heartbeat.started_at:
            return None
        return prev.heartbeat.started_at

    def forget(self, instance_id: str) -> None:
        self._views.pop(instance_id, None)

    def drop_exited(self, instance_id: str, exited_at: float) -> InstanceView | None:
        """Drop the run of `instance_id` whose process a supervisor saw exit at `exited_at`
        (Unix time) and return its last view; None if no such run is registered (unknown,
        already dropped, or the registered run started after the exit: a restart). Its
        heartbeats still on their way are ignored from now on (`is_dead_run`)."""
        view = self._views.get(instance_id)
        if view is None or view.heartbeat.started_at > exited_at:
            return None
        del self._views[instance_id]
        self._dead_runs[instance_id] = view.heartbeat.started_at
        return view

    def is_dead_run(self, heartbeat: Heartbeat) -> bool:
        """`heartbeat` comes from a run reported exited: sent before its process died."""
        return self._dead_runs.get(heartbeat.instance_id) == heartbeat.started_at

    def snapshot(self, now: float | None = None) -> ClusterSnapshot:
        """The registry's current picture; `now` defaults to the latest update's time."""
        return ClusterSnapshot(tuple(self._views.values()), self._now if now is None else now)

    def __contains__(self, instance_id: str) -> bool:
        return instance_id in self._views
