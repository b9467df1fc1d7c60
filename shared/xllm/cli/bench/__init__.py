"""Benchmarking a serving endpoint: traces, workloads, a streaming client, reports, plots.

`xllm bench serve` (in `xllm.cli.commands.bench`) puts them together; the simulator reads traces
through `load_trace` too.

    traces.py     shipped and custom traces -> TraceRequest (arrival, lengths, prefix blocks)
    workloads.py  random / sharegpt / trace -> BenchRequest (prompt, lengths, arrival)
    client.py     one streamed request, timed -> RequestRecord
    runner.py     arrivals, concurrency cap, progress bar -> BenchRun (records, duration)
    report.py     records -> Summary (throughput, latency percentiles, failures, goodput)
    plots.py      records -> PNG plots (matplotlib, imported lazily)
"""

from xllm.cli.bench.traces import TRACE_FILES, TraceRequest, data_dir, load_trace

__all__ = ["TRACE_FILES", "TraceRequest", "data_dir", "load_trace"]
