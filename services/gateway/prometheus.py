"""A tiny Prometheus registry: Counter, Gauge and Histogram with labels, no dependencies.

    registry = Registry()
    requests = registry.counter("xllm_requests_total", "Requests answered.", ("endpoint",))
    requests.labels(endpoint="/v1/completions").inc()
    latency = registry.histogram("xllm_latency_seconds", "End-to-end latency.")
    latency.observe(0.25)
    text = registry.render()  # the Prometheus text exposition format, version 0.0.4

A metric without label names is used directly (`latency.observe(...)`); one with label names
through `labels(...)`, which returns (and keeps) the child for that label set. Label sets
appear in the output in the order they were first used. Everything runs on one event loop,
so there are no locks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The Content-Type of `Registry.render()`'s output."""

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: from one decode step to a long generation."""

LabelValues = tuple[str, ...]


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str] = ()):
        self.name = name
        self.help = help
        self.labelnames = tuple(labelnames)
        self._children: dict[LabelValues, object] = {}
        if not self.labelnames:
            self.labels()  # an unlabelled metric shows its zero from the start

    def labels(self, **values: object):
        """The child for this label set (created on first use)."""
        if set(values) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(values)}")
        key = tuple(str(values[name]) for name in self.labelnames)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self._new_child()
        return child

    def clear(self) -> None:
        """Forget every label set (e.g. instances that left the cluster)."""
        if self.labelnames:
            self._children.clear()

    def _unlabelled(self):
        if self.labelnames:
            raise ValueError(f"{self.name} has labels {self.labelnames}: use .labels(...)")
        return self.labels()

    def _new_child(self) -> object:
        raise NotImplementedError

    def _samples(self) -> Iterable[tuple[str, LabelValues, tuple[tuple[str, str], ...], float]]:
        """(name suffix, label values, extra labels, value) for every sample line."""
        raise NotImplementedError

    def render(self) -> str:
        lines = [f"# HELP {self.name} {_escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        for suffix, values, extra, value in self._samples():
            pairs = [*zip(self.labelnames, values, strict=True), *extra]
            labels = ",".join(f'{k}="{_escape_label(v)}"' for k, v in pairs)
            labels = f"{{{labels}}}" if labels else ""
            lines.append(f"{self.name}{suffix}{labels} {_format(value)}")
        return "\n".join(lines) + "\n"


class _Value:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0


class _CounterChild(_Value):
    __slots__ = ()

    def inc(self, amount: float = 1.0) -> None:
        if amount < 0:
            raise ValueError(f"a counter only goes up; got inc({amount})")
        self.value += amount


class _GaugeChild(_Value):
    __slots__ = ()

    def set(self, value: float) -> None:
        self.value = float(value)

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class _HistogramChild:
    __slots__ = ("buckets", "count", "counts", "sum")

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value


class Counter(_Metric):
    """A value that only goes up; its name should end in `_total`."""

    kind = "counter"

    def _new_child(self) -> _CounterChild:
        return _CounterChild()

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def _samples(self):
        for values, child in self._children.items():
            yield "", values, (), child.value


class Gauge(_Metric):
    """A value that goes up and down."""

    kind = "gauge"

    def _new_child(self) -> _GaugeChild:
        return _GaugeChild()

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def inc(self, amount: float = 1.0) -> None:
        self._unlabelled().inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        self._unlabelled().dec(amount)

    def _samples(self):
        for values, child in self._children.items():
            yield "", values, (), child.value


class Histogram(_Metric):
    """Observations counted into cumulative buckets (`le`), plus their sum and count."""

    kind = "histogram"

    def __init__(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ):
        if "le" in labelnames:
            raise ValueError("'le' is reserved for histogram buckets")
        bounds = sorted(float(b) for b in buckets if not math.isinf(b))
        if not bounds:
            raise ValueError(f"{name}: a histogram needs at least one finite bucket")
        self.buckets = (*bounds, math.inf)
        super().__init__(name, help, labelnames)

    def _new_child(self) -> _HistogramChild:
        return _HistogramChild(self.buckets)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)

    def _samples(self):
        for values, child in self._children.items():
            cumulative = 0
            for bound, count in zip(self.buckets, child.counts, strict=True):
                cumulative += count
                yield "_bucket", values, (("le", _format_bound(bound)),), cumulative
            yield "_sum", values, (), child.sum
            yield "_count", values, (), child.count


class Registry:
    """The metrics of one process, rendered together."""

    def __init__(self) -> None:
        self._metrics: dict[str, _Metric] = {}

    def _add(self, metric: _Metric) -> _Metric:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name!r} is already registered")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Counter:
        return self._add(Counter(name, help, labelnames))  # type: ignore[return-value]

    def gauge(self, name: str, help: str, labelnames: Sequence[str] = ()) -> Gauge:
        return self._add(Gauge(name, help, labelnames))  # type: ignore[return-value]

    def histogram(
        self,
        name: str,
        help: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = DEFAULT_BUCKETS,
    ) -> Histogram:
        return self._add(Histogram(name, help, labelnames, buckets))  # type: ignore[return-value]

    def render(self) -> str:
        """Every metric in the Prometheus text format."""
        return "".join(metric.render() for metric in self._metrics.values())


def _format(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def _format_bound(bound: float) -> str:
    """A bucket's `le` as client libraries write it: 1.0, 0.25, +Inf."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
