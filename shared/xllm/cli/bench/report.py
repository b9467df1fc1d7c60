"""Per-request records → one summary: throughput, latency percentiles, failures, goodput.

Definitions (those of vLLM's `benchmark_serving`, so figures compare):

* throughputs divide by the run's duration (start → last response);
* TTFT, E2E from when the request was sent; TPOT = (E2E − TTFT) / (output tokens − 1) per
  request; ITL = every gap between chunks carrying text, pooled over requests;
* latency statistics cover successful requests only; times are reported in milliseconds;
* a request meets the SLOs when it succeeded, its TTFT ≤ `slo_ttft_ms` and its TPOT ≤
  `slo_tpot_ms` (an SLO not given always holds; a one-token output has no TPOT and meets
  any TPOT SLO); goodput = such requests per second, attainment = their share of all sent.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np

from xllm.cli.bench.client import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    ttft_ms: float | None = None
    tpot_ms: float | None = None

    def met_by(self, r: RequestRecord) -> bool:
        if not r.ok:
            return False
        ttft_ok = self.ttft_ms is None or (r.ttft is not None and r.ttft * 1e3 <= self.ttft_ms)
        tpot_ok = self.tpot_ms is None or r.tpot is None or r.tpot * 1e3 <= self.tpot_ms
        return ttft_ok and tpot_ok


@dataclass(frozen=True)
class LatencyStats:
    """Milliseconds; NaN-free: an empty sample gives zeros and count 0."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, seconds: list[float]) -> LatencyStats:
        if not seconds:
            return cls(0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds) * 1e3
        p50, p90, p99 = (float(np.percentile(ms, p)) for p in PERCENTILES)
        return cls(len(ms), float(ms.mean()), p50, p90, p99)


@dataclass(frozen=True)
class Summary:
    duration_s: float
    requests: int
    completed: int
    failed: int
    failures: dict[str, int]
    input_tokens: int
    cached_input_tokens: int
    """Input tokens the server reported as prefix-cache hits (0 if it reports none)."""
    output_tokens: int
    request_throughput: float
    """Completed requests per second."""
    output_throughput: float
    """Output tokens of completed requests per second."""
    total_token_throughput: float
    """Input plus output tokens of completed requests per second."""
    ttft_ms: LatencyStats
    tpot_ms: LatencyStats
    itl_ms: LatencyStats
    e2e_ms: LatencyStats
    slo: Slo = field(default_factory=Slo)
    good_requests: int = 0
    goodput: float = 0.0
    """Requests per second that succeeded within both SLOs."""
    slo_attainment: float = 0.0
    """Share of all requests that succeeded within both SLOs."""

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: list[RequestRecord], duration: float, slo: Slo = Slo()) -> Summary:
    ok = [r for r in records if r.ok]
    good = sum(slo.met_by(r) for r in records)
    per_s = 1.0 / duration if duration > 0 else 0.0
    input_tokens = sum(_input_tokens(r) for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return Summary(
        duration_s=duration,
        requests=len(records),
        completed=len(ok),
        failed=len(records) - len(ok),
        failures=dict(Counter(r.error for r in records if r.error)),
        input_tokens=input_tokens,
        cached_input_tokens=sum(r.cached_tokens or 0 for r in ok),
        output_tokens=output_tokens,
        request_throughput=len(ok) * per_s,
        output_throughput=output_tokens * per_s,
        total_token_throughput=(input_tokens + output_tokens) * per_s,
        ttft_ms=LatencyStats.of([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=LatencyStats.of([r.tpot for r in ok if r.tpot is not None]),
        itl_ms=LatencyStats.of([gap for r in ok for gap in r.itl]),
        e2e_ms=LatencyStats.of([r.e2e for r in ok]),
        slo=slo,
        good_requests=good,
        goodput=good * per_s,
        slo_attainment=good / len(records) if records else 0.0,
    )


def _input_tokens(r: RequestRecord) -> int:
    """The server's prompt count when it reported one (chat adds its template), else ours."""
    return r.prompt_tokens if r.prompt_tokens is not None else r.input_len


def format_table(s: Summary) -> str:
    """The summary as a fixed-width table for people (the JSON line is for programs)."""
    lines = [
        f"{'requests':<28}{s.completed} ok / {s.requests} sent in {s.duration_s:.2f} s",
        f"{'failures':<28}{s.failures or 'none'}",
        f"{'input / cached / output':<28}{s.input_tokens} / {s.cached_input_tokens} / "
        f"{s.output_tokens} tokens",
        f"{'request throughput':<28}{s.request_throughput:.2f} req/s",
        f"{'output token throughput':<28}{s.output_throughput:.1f} tok/s",
        f"{'total token throughput':<28}{s.total_token_throughput:.1f} tok/s",
        f"{'':<28}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, stats in (("TTFT", s.ttft_ms), ("TPOT", s.tpot_ms), ("ITL", s.itl_ms)):
        lines.append(_stats_row(f"{name} (ms)", stats))
    lines.append(_stats_row("E2E (ms)", s.e2e_ms))
    slo = f"TTFT <= {s.slo.ttft_ms} ms, TPOT <= {s.slo.tpot_ms} ms"
    lines.append(f"{'goodput':<28}{s.goodput:.2f} req/s ({s.slo_attainment:.1%} within {slo})")
    return "\n".join(lines)


def _stats_row(name: str, stats: LatencyStats) -> str:
    values = (stats.mean, stats.p50, stats.p90, stats.p99)
    return f"{name:<28}" + "".join(
        f"{v:>10.1f}" if math.isfinite(v) else f"{'-':>10}" for v in values
    )
