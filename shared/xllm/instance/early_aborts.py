"""EarlyAborts: aborts for requests this instance does not hold (yet).

In PD disaggregation the gateway's `AbortCmd` can overtake the command that would bring the
request here: a decode instance's `DecodeCmd` (from the scheduler) or a prefill instance's
`PrefillCmd` (from the decode instance). Such a command must then not start anything: the
decode side drops it, the prefill side answers it "aborted" at once. So the instance
remembers the last `capacity` aborts that found nothing to abort.
"""

from __future__ import annotations

CAPACITY = 4096
"""Aborts remembered; a command arrives within milliseconds of its abort, not thousands
of aborts later."""


class EarlyAborts:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._ids: dict[str, None] = {}
        """Oldest first (a dict as an ordered set)."""

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        if len(self._ids) > self.capacity:
            del self._ids[next(iter(self._ids))]

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._ids
