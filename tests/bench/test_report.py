"""The summary on hand-made records: throughputs, percentiles, failures, goodput."""

from __future__ import annotations

import pytest

from xllm.cli.bench.client import RequestRecord
from xllm.cli.bench.report import Slo, format_table, summarize
from xllm.cli.bench.runner import LoadConfig, arrival_times
from xllm.cli.bench.workloads import BenchRequest, LengthRange


def record(i: int, ttft: float, tpot: float, n: int = 11, error: str | None = None):
    """A request sent at t=i of `n` output tokens with the given TTFT and even gaps."""
    r = RequestRecord(i, input_len=100, output_len=n, arrival=float(i), sent=float(i))
    r.ttft, r.itl, r.output_tokens, r.error = ttft, [tpot] * (n - 1), n, error
    r.end = r.sent + ttft + tpot * (n - 1)
    return r


@pytest.fixture
def records() -> list[RequestRecord]:
    return [
        record(0, ttft=0.1, tpot=0.01),  # meets both
        record(1, ttft=0.3, tpot=0.01),  # TTFT too slow
        record(2, ttft=0.1, tpot=0.05),  # TPOT too slow
        record(3, ttft=0.18, tpot=0.015),  # meets both
        record(4, ttft=0.1, tpot=0.01, error="wrong_length"),  # failed: never good
        record(5, ttft=0.15, tpot=0.0, n=1),  # no TPOT: meets any TPOT SLO
    ]


def test_goodput_counts_successes_within_both_slos(records):
    s = summarize(records, duration=10.0, slo=Slo(ttft_ms=200, tpot_ms=20))
    assert s.good_requests == 3  # records 0, 3 and 5
    assert s.goodput == pytest.approx(0.3)
    assert s.slo_attainment == pytest.approx(3 / 6)


def test_without_slos_goodput_is_the_completed_rate(records):
    s = summarize(records, duration=10.0)
    assert s.good_requests == s.completed == 5
    assert s.goodput == s.request_throughput == pytest.approx(0.5)


def test_throughputs_and_failures(records):
    s = summarize(records, duration=10.0)
    assert (s.requests, s.failed, s.failures) == (6, 1, {"wrong_length": 1})
    assert s.output_tokens == 11 * 4 + 1
    assert s.input_tokens == 500  # failed requests count for nothing
    assert s.output_throughput == pytest.approx(4.5)
    assert s.total_token_throughput == pytest.approx(54.5)


def test_latency_percentiles_in_ms(records):
    s = summarize(records, duration=10.0)
    assert s.ttft_ms.count == 5
    assert s.ttft_ms.mean == pytest.approx((100 + 300 + 100 + 180 + 150) / 5)
    assert s.ttft_ms.p50 == pytest.approx(150)
    assert s.ttft_ms.p90 == pytest.approx(252)  # linear between 180 and 300
    assert s.tpot_ms.count == 4  # the one-token output has none
    assert s.tpot_ms.p50 == pytest.approx(12.5)  # of 10, 10, 15, 50
    assert s.itl_ms.count == 40
    assert s.e2e_ms.p99 == pytest.approx(max(r.e2e for r in records if r.ok) * 1e3, rel=0.05)


def test_tpot_is_decode_time_per_token_after_the_first():
    r = record(0, ttft=0.5, tpot=0.04, n=6)
    assert r.tpot == pytest.approx(0.04)
    assert record(0, ttft=0.5, tpot=0.0, n=1).tpot is None


def test_empty_run_and_table():
    s = summarize([], duration=0.0)
    assert (s.requests, s.goodput, s.ttft_ms.count) == (0, 0.0, 0)
    assert "goodput" in format_table(s)


def test_arrivals_poisson_trace_or_all_at_once():
    reqs = [BenchRequest([1], 1, 1, arrival=float(i)) for i in range(2000)]
    assert arrival_times(reqs, LoadConfig()) == [float(i) for i in range(2000)]
    assert arrival_times(reqs, LoadConfig(request_rate=float("inf"))) == [0.0] * 2000
    poisson = arrival_times(reqs, LoadConfig(request_rate=20.0, seed=3))
    assert poisson[0] == 0.0 and poisson == sorted(poisson)
    assert poisson[-1] / 1999 == pytest.approx(1 / 20, rel=0.1)  # mean gap 1/rate


def test_length_range_parsing():
    assert LengthRange.parse("32") == LengthRange(32, 32)
    assert LengthRange.parse("8:64") == LengthRange(8, 64)
    with pytest.raises(ValueError):
        LengthRange.parse("64:8")
