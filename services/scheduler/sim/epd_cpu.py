"""Processes sharing fewer cores than there are of them, for the EPD simulator.

Every instance and encoder of a deployment on one machine is a process of its own, each
running one torch thread (`--num-threads 1`, as the profiler measured its steps). While b
of them are busy on `cores` cores, each runs at min(1, cores / b) of the speed it was
measured at (the kernel shares the cores out evenly), so a step of s seconds of work lasts
s x b / cores while b > cores stay busy. `CpuShare` keeps each running job's work left and
says when the next one ends; the simulator asks again whenever a job starts or ends, since
the share changes then (a plain processor-sharing queue, exact between those moments).
"""

from __future__ import annotations

from dataclasses import dataclass, field

DONE = 1e-9
"""Work left (seconds) below which a job is over: float rounding of the shares."""


@dataclass
class CpuShare:
    cores: int
    jobs: dict[int, list] = field(default_factory=dict)
    """Job id -> [seconds of work left, what ends with it]."""
    since: float = 0.0
    """When the work left was last brought up to date."""
    version: int = 0
    """Bumped at every change: an end announced before it is stale."""
    _ids: int = 0

    @property
    def speed(self) -> float:
        """Each busy job's share of a core."""
        return min(1.0, self.cores / len(self.jobs)) if self.jobs else 1.0

    def advance(self, now: float) -> None:
        done = (now - self.since) * self.speed
        for job in self.jobs.values():
            job[0] -= done
        self.since = now

    def start(self, now: float, work: float, then: object) -> None:
        """A job of `work` seconds (alone on a core) begins now; `then` is handed back when
        it ends."""
        self.advance(now)
        self._ids += 1
        self.jobs[self._ids] = [work, then]
        self.version += 1

    def take_done(self, now: float) -> list[object]:
        """The `then` of every job over by now, oldest first."""
        self.advance(now)
        over = [i for i, (left, _) in self.jobs.items() if left <= DONE]
        self.version += 1
        return [self.jobs.pop(i)[1] for i in over]

    def next_end(self) -> float | None:
        """When the first running job ends, if the share stays as it is."""
        if not self.jobs:
            return None
        return self.since + max(0.0, min(left for left, _ in self.jobs.values())) / self.speed
