"""LostPeers: which peer instances were announced lost, remembered for a while.

The scheduler announces a dead instance once (`InstanceLost`). Commands naming it may still
be on their way, or queued here waiting for room; starting a transfer with a dead peer would
hold blocks until the transfer timeout for an answer that never comes. So an instance
remembers each loss for `memory` seconds and drops such commands.

A peer is a run of an instance id: a supervisor may restart a killed instance under the
same id within seconds, and the new run (its `Heartbeat.started_at`) is a new peer. A run
of 0 means "unknown" and matches the lost run, so an old sender is not trusted blindly.
"""

from __future__ import annotations

import time
from collections.abc import Callable

LOST_PEER_MEMORY = 30.0
"""Seconds after a peer is announced lost during which commands naming it are dropped."""


class LostPeers:
    def __init__(
        self, memory: float = LOST_PEER_MEMORY, clock: Callable[[], float] = time.monotonic
    ):
        self.memory = memory
        self.clock = clock
        self._lost: dict[str, tuple[float, float]] = {}
        """instance id -> (when it was announced lost, which run: started_at, 0 = unknown)."""

    def note(self, instance_id: str, started_at: float = 0.0) -> None:
        """`instance_id`'s run `started_at` was announced lost (now)."""
        self._lost[instance_id] = (self.clock(), started_at)

    def lost(self, instance_id: str, started_at: float = 0.0) -> bool:
        """The run `started_at` of `instance_id` was announced lost within `memory` seconds.
        A different run (restarted under the same id) is a new peer; an unknown run (0 on
        either side) counts as the lost one."""
        entry = self._lost.get(instance_id)
        if entry is None:
            return False
        lost_at, lost_run = entry
        if started_at and lost_run and started_at != lost_run:
            return False
        return self.clock() - lost_at < self.memory
