"""Drive a workload against a server: arrivals, a concurrency cap, a progress bar.

Arrivals are open-loop: request i is due at its time (Poisson at `request_rate`, else the
trace's own time, else 0 = all at once) whatever the server does; a `concurrency` cap then
holds due requests back until a slot frees, which is the client-side queue the plots show.
`concurrency` without a rate or trace times is the usual closed loop of C clients.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from dataclasses import dataclass

import aiohttp

from xllm.cli.bench.client import ClientConfig, RequestRecord, send
from xllm.cli.bench.workloads import BenchRequest


@dataclass(frozen=True)
class LoadConfig:
    concurrency: int | None = None
    """Most requests in flight at once; None = no cap."""
    request_rate: float | None = None
    """Poisson arrivals at this many requests/s (inf = all at once); None = the requests' own
    arrival times (a trace's), or all at once when they have none."""
    seed: int = 0
    timeout: float = 3600.0
    """Seconds one request may take before it is recorded as a `timeout`."""
    progress: bool = True
    warmup: int = 1
    """Requests (copies of the first) sent one by one before the clock starts; a failed one
    stops the run, so an unreachable or rejecting server fails fast."""


class WarmupFailed(RuntimeError):
    """The server failed a warm-up request (the message says how)."""


@dataclass
class BenchRun:
    records: list[RequestRecord]
    duration: float
    """Seconds from the start to the last response's end."""


def arrival_times(requests: list[BenchRequest], load: LoadConfig) -> list[float]:
    """When each request is due, in seconds from the start."""
    rate = load.request_rate
    if rate is None:
        return [r.arrival or 0.0 for r in requests]
    if math.isinf(rate):
        return [0.0] * len(requests)
    rng = random.Random(load.seed)
    times, t = [], 0.0
    for _ in requests:
        times.append(t)
        t += rng.expovariate(rate)
    return times


def run_load(requests: list[BenchRequest], client: ClientConfig, load: LoadConfig) -> BenchRun:
    """Run the whole workload (blocking) and return every request's record, in input order."""
    return asyncio.run(run_load_async(requests, client, load))


async def run_load_async(
    requests: list[BenchRequest], client: ClientConfig, load: LoadConfig
) -> BenchRun:
    times = arrival_times(requests, load)
    records = [
        RequestRecord(i, r.input_len, r.output_len, arrival=t)
        for i, (r, t) in enumerate(zip(requests, times, strict=True))
    ]
    slots = asyncio.Semaphore(load.concurrency) if load.concurrency else None
    timeout = aiohttp.ClientTimeout(total=load.timeout)
    connector = aiohttp.TCPConnector(limit=load.concurrency or 0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        await _warm_up(session, requests[:1] * load.warmup, client)
        bar = _ProgressBar(len(requests), load.progress)
        start = time.perf_counter()

        async def one(request: BenchRequest, record: RequestRecord) -> None:
            await asyncio.sleep(max(0.0, record.arrival - (time.perf_counter() - start)))
            if slots is None:
                await send(session, client, request, record, start)
            else:
                async with slots:
                    await send(session, client, request, record, start)
            bar.update(1, failed=not record.ok)

        await asyncio.gather(*(one(r, rec) for r, rec in zip(requests, records, strict=True)))
    bar.close()
    duration = max((r.end for r in records), default=0.0)
    return BenchRun(records, duration)


async def _warm_up(
    session: aiohttp.ClientSession, requests: list[BenchRequest], client: ClientConfig
) -> None:
    for request in requests:
        record = RequestRecord(-1, request.input_len, request.output_len, arrival=0.0)
        await send(session, client, request, record, time.perf_counter())
        if not record.ok:
            raise WarmupFailed(f"warm-up request failed: {record.error} {record.detail}")


class _ProgressBar:
    """tqdm on stderr with a failure count; a plain counter line without tqdm; or nothing."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.failed = total, 0, 0
        self.enabled = enabled
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:  # the `bench` extra is not installed
                return
            self.bar = tqdm(total=total, unit="req", file=sys.stderr, dynamic_ncols=True)

    def update(self, n: int, failed: bool) -> None:
        self.done += n
        self.failed += failed
        if self.bar is not None:
            self.bar.update(n)
            if failed:
                self.bar.set_postfix(failed=self.failed)
        elif self.enabled:
            print(
                f"\r{self.done}/{self.total} requests, {self.failed} failed",
                end="",
                file=sys.stderr,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            print(file=sys.stderr)
