"""PNG plots of one run, from its records: latency CDFs, throughput and queues over time.

matplotlib is imported here only (Agg backend, no display), so the benchmark runs without it
unless `--plot` is asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xllm.cli.bench.client import RequestRecord


def write_plots(records: list[RequestRecord], out_dir: str | Path, title: str = "") -> list[Path]:
    """Write `latency_cdf.png`, `throughput.png` and `queue.png` into `out_dir`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in (
        ("latency_cdf", _latency_cdfs),
        ("throughput", _throughput),
        ("queue", _queue),
    ):
        fig = draw(plt, records)
        fig.suptitle(f"{title} {name.replace('_', ' ')}".strip())
        fig.tight_layout()
        path = out / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _latency_cdfs(plt, records: list[RequestRecord]):
    ok = [r for r in records if r.ok]
    series = {
        "TTFT": [r.ttft for r in ok if r.ttft is not None],
        "TPOT": [r.tpot for r in ok if r.tpot is not None],
        "ITL": [gap for r in ok for gap in r.itl],
        "E2E": [r.e2e for r in ok],
    }
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for ax, (name, seconds) in zip(axes, series.items(), strict=True):
        ms = np.sort(np.asarray(seconds) * 1e3)
        if len(ms):
            ax.plot(ms, np.arange(1, len(ms) + 1) / len(ms))
        ax.set_xlabel(f"{name} (ms)")
        ax.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        ax.grid(alpha=0.3)
    return fig


def _throughput(plt, records: list[RequestRecord]):
    """Output tokens and completed requests per 1-second bucket.

    A chunk may carry several tokens; each chunk of a request weighs its share of the
    request's token count, so the buckets add up to the tokens the server reported.
    """
    edges = _edges(records)
    times, weights = [], []
    for r in records:
        chunks = _text_chunk_times(r) if r.ok else []
        times += chunks
        weights += [r.output_tokens / len(chunks)] * len(chunks) if chunks else []
    tokens = np.histogram(times, edges, weights=weights)[0]
    done = np.histogram([r.end for r in records if r.ok], edges)[0]
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(edges[:-1], tokens, label="output tokens/s")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens per second")
    twin = ax.twinx()
    twin.plot(edges[:-1], done, color="tab:orange", label="completed req/s")
    twin.set_ylabel("completed requests per second")
    fig.legend(loc="upper right")
    return fig


def _queue(plt, records: list[RequestRecord]):
    """Requests in flight (sent, not done) and waiting on the client (due, not sent), as
    time-weighted means over 400 bins: sampling at instants would show millisecond blips
    (the client's own scheduling lag) as whole requests."""
    arrival, sent, end = (np.array([getattr(r, k) for r in records]) for k in _TIMES)
    edges = np.linspace(0.0, end.max(initial=1.0), 401)
    fig, ax = plt.subplots(figsize=(10, 3.6))
    ax.plot(edges[:-1], _mean_open(sent, end, edges), label="in flight (on the server)")
    ax.plot(edges[:-1], _mean_open(arrival, sent, edges), label="waiting for a client slot")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("requests (mean per bin)")
    ax.legend()
    return fig


_TIMES = ("arrival", "sent", "end")


def _mean_open(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Mean number of intervals [start, end) open over each bin of `edges`."""
    lo, hi = edges[:-1], edges[1:]  # [B]
    overlap = np.minimum(ends[:, None], hi) - np.maximum(starts[:, None], lo)  # [N, B]
    return np.clip(overlap, 0.0, None).sum(axis=0) / (hi - lo)  # [B]


def _edges(records: list[RequestRecord]) -> np.ndarray:
    end = max((r.end for r in records), default=1.0)
    return np.arange(0.0, np.ceil(end) + 1.0, 1.0)


def _text_chunk_times(r: RequestRecord) -> list[float]:
    """When each chunk carrying text arrived, rebuilt from TTFT and the gaps."""
    if r.ttft is None:
        return []
    times = [r.sent + r.ttft]
    for gap in r.itl:
        times.append(times[-1] + gap)
    return times
