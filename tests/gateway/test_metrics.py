"""services.gateway.prometheus: the Prometheus text exposition format."""

from __future__ import annotations

import pytest

from services.gateway.prometheus import Registry


def test_counter_gauge_histogram_text():
    r = Registry()
    requests = r.counter("req_total", "Requests.\nAll of them.", ("endpoint", "status"))
    requests.labels(endpoint="/v1/completions", status=200).inc()
    requests.labels(endpoint="/v1/completions", status=200).inc(2)
    requests.labels(endpoint='a"b\\c\nd', status=400).inc()
    running = r.gauge("running", "In flight.")
    running.inc(3)
    running.dec()
    latency = r.histogram("latency_seconds", "Latency.", buckets=(0.1, 1.0))
    for value in (0.05, 0.5, 0.5, 7.0):
        latency.observe(value)
    assert r.render() == (
        "# HELP req_total Requests.\\nAll of them.\n"
        "# TYPE req_total counter\n"
        'req_total{endpoint="/v1/completions",status="200"} 3\n'
        'req_total{endpoint="a\\"b\\\\c\\nd",status="400"} 1\n'
        "# HELP running In flight.\n"
        "# TYPE running gauge\n"
        "running 2\n"
        "# HELP latency_seconds Latency.\n"
        "# TYPE latency_seconds histogram\n"
        'latency_seconds_bucket{le="0.1"} 1\n'
        'latency_seconds_bucket{le="1.0"} 3\n'
        'latency_seconds_bucket{le="+Inf"} 4\n'
        "latency_seconds_sum 8.05\n"
        "latency_seconds_count 4\n"
    )


def test_labelled_histogram_and_clear():
    r = Registry()
    h = r.histogram("ttft_seconds", "TTFT.", ("model",), buckets=(1,))
    h.labels(model="m").observe(0.5)
    assert 'ttft_seconds_bucket{model="m",le="1.0"} 1' in r.render()
    assert 'ttft_seconds_count{model="m"} 1' in r.render()
    g = r.gauge("waiting", "Waiting.", ("instance",))
    g.labels(instance="a").set(4)
    g.clear()
    assert "waiting{" not in r.render()


def test_unlabelled_metrics_show_zero_from_the_start():
    r = Registry()
    r.counter("tokens_total", "Tokens.")
    r.histogram("lat", "Lat.", buckets=(1,))
    text = r.render()
    assert "tokens_total 0\n" in text and "lat_count 0\n" in text


def test_misuse_raises():
    r = Registry()
    c = r.counter("c_total", "C.", ("a",))
    with pytest.raises(ValueError):
        c.labels(b="x")
    with pytest.raises(ValueError):
        c.inc()  # labelled: needs .labels(...)
    with pytest.raises(ValueError):
        c.labels(a="x").inc(-1)
    with pytest.raises(ValueError):
        r.counter("c_total", "again")
    with pytest.raises(ValueError):
        r.histogram("h", "H.", ("le",))


def _ended(ttft: float, tpot: float, tokens: int = 5, priority: int = 0, finished: bool = True):
    """What `GatewayMetrics.observe_generation` reads of an ended `Generation`."""
    from types import SimpleNamespace

    return SimpleNamespace(
        usage=SimpleNamespace(prompt_tokens=10, completion_tokens=tokens),
        finished=finished,
        started_at=100.0,
        first_token_at=100.0 + ttft,
        last_token_at=100.0 + ttft + tpot * (tokens - 1),
        completions=[object()],
        req=SimpleNamespace(priority=priority),
    )


def test_online_slo_attainment_counts_finished_online_requests_within_both_targets():
    from services.gateway.metrics import GatewayMetrics
    from xllm.config import SloConfig

    metrics = GatewayMetrics(SloConfig(slo_ttft=1.0, slo_tpot=0.1))
    metrics.observe_generation(_ended(ttft=0.5, tpot=0.05))  # met
    metrics.observe_generation(_ended(ttft=1.5, tpot=0.05))  # TTFT missed
    metrics.observe_generation(_ended(ttft=0.5, tpot=0.2))  # TPOT missed
    metrics.observe_generation(_ended(ttft=0.5, tpot=0.5, tokens=1))  # one token: no TPOT
    metrics.observe_generation(_ended(ttft=9.0, tpot=0.05, priority=1))  # offline: not counted
    metrics.observe_generation(_ended(ttft=9.0, tpot=0.05, finished=False))  # failed: neither
    text = metrics.render()
    assert "xllm_gateway_online_requests_finished_total 4" in text
    assert "xllm_gateway_online_requests_slo_met_total 2" in text
    assert "xllm_gateway_online_slo_attainment 0.5" in text


def test_without_targets_every_finished_online_request_meets_them():
    from services.gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics()
    metrics.observe_generation(_ended(ttft=30.0, tpot=5.0))
    text = metrics.render()
    assert "xllm_gateway_online_requests_slo_met_total 1" in text
    assert "xllm_gateway_online_requests_finished_total 1" in text
