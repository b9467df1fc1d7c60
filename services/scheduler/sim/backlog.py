"""An offline backlog beside a trace (report §3.1): best-effort requests present from t = 0.

Live, offline jobs wait in a JetStream stream and the gateways' offline workers submit a
bounded number at a time (`--offline-concurrency`), the next one as one finishes. The
simulator does the same with `OfflineBacklog`: `concurrency` requests submitted at t = 0,
each finished (or refused) one replaced at once by the next, until the backlog is empty or
the online trace is over (what is still in flight then finishes; nothing new starts).
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable

from services.scheduler.sim.instance import SimRequest

OFFLINE_PRIORITY = 1
"""The offline jobs' priority class, as `services.gateway.offline.PRIORITY`."""


def sharegpt_backlog(
    n: int, output_len: tuple[int, int], input_len: int = 0, seed: int = 1
) -> list[SimRequest]:
    """`n` offline requests: ShareGPT prompt lengths (or `input_len` tokens each, if > 0),
    output lengths uniform in `output_len` (inclusive)."""
    from xllm.cli.bench.workloads import LengthRange, PromptMaker, sharegpt_workload

    rng = random.Random(seed)
    if input_len > 0:
        prompts = [input_len] * n
        outputs = [rng.randint(*output_len) for _ in range(n)]
    else:
        maker = PromptMaker(None, chat=False)
        workload = sharegpt_workload(n, LengthRange(*output_len), maker, seed=seed)
        prompts = [r.input_len for r in workload]
        outputs = [r.output_len for r in workload]
    return [
        SimRequest(f"offline-{i}", 0.0, p, o, priority=OFFLINE_PRIORITY)
        for i, (p, o) in enumerate(zip(prompts, outputs, strict=True))
    ]


class OfflineBacklog:
    def __init__(self, requests: Iterable[SimRequest], concurrency: int = 0):
        self.requests = list(requests)
        self.concurrency = concurrency or len(self.requests)
        """Offline requests submitted at once (0: the whole backlog at t = 0)."""
        self._queue = deque(self.requests)
        self.submitted: list[SimRequest] = []
        """The requests submitted so far, in order."""
        self.num_in_flight = 0

    def start(self) -> list[SimRequest]:
        """What is submitted at t = 0."""
        return [self._take(0.0) for _ in range(min(self.concurrency, len(self._queue)))]

    def done(self, now: float, online_over: bool) -> SimRequest | None:
        """One offline request finished or was refused: the next to submit now, if any."""
        self.num_in_flight -= 1
        if online_over or not self._queue:
            return None
        return self._take(now)

    def _take(self, now: float) -> SimRequest:
        req = self._queue.popleft()
        req.arrival = now
        self.submitted.append(req)
        self.num_in_flight += 1
        return req
