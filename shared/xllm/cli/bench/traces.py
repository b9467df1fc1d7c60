"""Request traces as `TraceRequest`s: arrival time, prompt and output lengths, prefix blocks.

`load_trace(name_or_path)` reads one of the traces shipped in `data_dir()` by name, or any
CSV, JSON Lines or JSON-array file (optionally gzipped) with an arrival time and two lengths:

| name         | file                                   | time unit       | extra        |
| ------------ | -------------------------------------- | --------------- | ------------ |
| `azure-code` | AzureLLMInferenceTrace_code.csv.gz     | wall clock text | -            |
| `mooncake`   | mooncake_conversation_trace.jsonl.gz   | milliseconds    | `hash_ids`   |
| `burstgpt`   | BurstGPT_1_first400.csv                | seconds         | -            |
| `burstgpt-3` | BurstGPT_3_first400.csv                | seconds         | `session_id` |

Columns are recognised by name (`_SCHEMAS` first, then `_GENERIC_*` name patterns), so a full
BurstGPT or another Mooncake trace given by path reads the same way as the samples. Numeric
times are seconds unless the column's name ends in `ms`; text times are ISO date-times.

NOTE: rows with 0 output tokens are dropped. BurstGPT marks failed requests that way (17 of
the BurstGPT_1 sample, 1 of BurstGPT_3); replaying them would invent a request the trace never
served, and a failure of the original service says nothing about the server under test.

Order of operations: parse, sort by time, re-base to the first request, keep the window
`[start, start + duration)` (seconds of the original trace), re-base to the first request
kept, cap at `limit`, then scale times and lengths.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from xllm.config import from_env, option

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per `hash_ids` entry in the raw Mooncake trace."""


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float
    """Seconds since the trace's first request (after windowing and `time_scale`)."""
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    """Mooncake prefix-block ids (512 tokens per block in the raw trace)."""
    session_id: str | None = None
    """Conversation id (BurstGPT_3); None when the trace has none or the row is an API call."""


@dataclass(frozen=True)
class _Schema:
    """Which columns hold what, and how to turn the time column into seconds."""

    time: str
    input: str
    output: str
    time_unit: float = 1.0  # seconds per unit of a numeric time column
    hash_ids: str | None = None
    session: str | None = None


# Known formats, recognised by their columns (so full files given by path work too).
_SCHEMAS = (
    _Schema("TIMESTAMP", "ContextTokens", "GeneratedTokens"),  # Azure 2023 / 2024
    _Schema("timestamp", "input_length", "output_length", 1e-3, hash_ids="hash_ids"),  # Mooncake
    _Schema("Timestamp", "Request tokens", "Response tokens", session="Session ID"),  # BurstGPT
)

TRACE_FILES = {
    "azure-code": "AzureLLMInferenceTrace_code.csv.gz",
    "mooncake": "mooncake_conversation_trace.jsonl.gz",
    "burstgpt": "BurstGPT_1_first400.csv",
    "burstgpt-3": "BurstGPT_3_first400.csv",
}

# Name patterns for other files; the first column matching a pattern wins.
_GENERIC_TIME = re.compile(r"timestamp|arrival|^time|_time$|^ts$", re.I)
_GENERIC_INPUT = re.compile(r"input|prompt|context|request.?tok", re.I)
_GENERIC_OUTPUT = re.compile(r"output|generated|completion|response.?tok|decode", re.I)
_MILLISECONDS = re.compile(r"(^|[_ ])ms$|_ms_|millis", re.I)


@dataclass(frozen=True)
class TraceConfig:
    data_dir: str = option("", "Folder of the shipped traces; empty = <repo>/../shared/data.")


def data_dir() -> Path:
    """Folder of the shipped traces: `$XLLM_DATA_DIR`, else `<repo root>/../shared/data`."""
    configured = from_env(TraceConfig).data_dir
    if configured:
        return Path(configured)
    repo_root = Path(__file__).resolve().parents[4]  # shared/xllm/cli/bench/traces.py
    return repo_root.parent / "shared" / "data"


def trace_path(name_or_path: str) -> Path:
    """The file behind a trace name, or the path itself."""
    if name_or_path in TRACE_FILES:
        return data_dir() / TRACE_FILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        names = ", ".join(TRACE_FILES)
        raise FileNotFoundError(f"no trace file {path} (known trace names: {names})")
    return path


def load_trace(
    name_or_path: str,
    *,
    limit: int | None = None,
    start: float = 0.0,
    duration: float | None = None,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    min_len: int = 1,
) -> list[TraceRequest]:
    """The trace's requests in arrival order; see the module docstring for the steps.

    `time_scale` multiplies inter-arrival times (0.5 replays twice as fast); `length_scale`
    multiplies both lengths, rounded and clamped to at least `min_len`.
    """
    if time_scale <= 0 or length_scale <= 0:
        raise ValueError("time_scale and length_scale must be positive")
    requests = sorted(_read(trace_path(name_or_path)), key=lambda r: r.arrival)
    requests = _rebase(requests)
    end = float("inf") if duration is None else start + duration
    requests = _rebase([r for r in requests if start <= r.arrival < end])
    if limit is not None:
        requests = requests[:limit]
    return [_scaled(r, time_scale, length_scale, min_len) for r in requests]


def _rebase(requests: list[TraceRequest]) -> list[TraceRequest]:
    if not requests:
        return requests
    t0 = requests[0].arrival
    return [replace(r, arrival=r.arrival - t0) for r in requests]


def _scaled(r: TraceRequest, time_scale: float, length_scale: float, min_len: int) -> TraceRequest:
    def scale(n: int) -> int:
        return max(min_len, round(n * length_scale))

    return replace(
        r,
        arrival=r.arrival * time_scale,
        input_len=scale(r.input_len),
        output_len=scale(r.output_len),
    )


def _read(path: Path) -> Iterator[TraceRequest]:
    rows = _rows(path)
    first = next(rows, None)
    if first is None:
        return
    schema = _schema(list(first), path)
    for row in (first, *rows):
        request = _request(row, schema)
        if request.output_len > 0:  # 0 = a failed request (BurstGPT); see the NOTE above
            yield request


def _rows(path: Path) -> Iterator[dict]:
    """Rows as dicts, from CSV (with header), JSON Lines or a JSON array; gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="") as f:
        if ".jsonl" in path.suffixes:
            yield from (json.loads(line) for line in f if line.strip())
        elif ".json" in path.suffixes:
            yield from json.load(f)
        else:
            yield from csv.DictReader(f)


def _schema(columns: list[str], path: Path) -> _Schema:
    """The known schema whose columns are all present, else one guessed from column names."""
    for schema in _SCHEMAS:
        if {schema.time, schema.input, schema.output} <= set(columns):
            present = set(columns)
            return replace(
                schema,
                hash_ids=schema.hash_ids if schema.hash_ids in present else None,
                session=schema.session if schema.session in present else None,
            )
    found = [_first_match(p, columns) for p in (_GENERIC_TIME, _GENERIC_INPUT, _GENERIC_OUTPUT)]
    if None in found:
        raise ValueError(
            f"{path}: cannot tell which columns hold the arrival time, input length and output "
            f"length (found: {', '.join(columns)}); name them like "
            "timestamp / input_length / output_length"
        )
    time, input_, output = found
    unit = 1e-3 if _MILLISECONDS.search(time) else 1.0
    return _Schema(time, input_, output, unit)


def _first_match(pattern: re.Pattern[str], columns: list[str]) -> str | None:
    return next((c for c in columns if pattern.search(c)), None)


def _request(row: dict, schema: _Schema) -> TraceRequest:
    hash_ids = tuple(row[schema.hash_ids]) if schema.hash_ids else ()
    session = row.get(schema.session) if schema.session else None
    return TraceRequest(
        arrival=_seconds(row[schema.time], schema.time_unit),
        input_len=int(float(row[schema.input])),
        output_len=int(float(row[schema.output])),
        hash_ids=hash_ids,
        session_id=session or None,
    )


_EPOCH = datetime(1970, 1, 1)


def _seconds(value: object, unit: float) -> float:
    """A time cell in seconds: a number times `unit`, or a date-time text (Azure's
    `2023-11-16 18:17:03.9799600`, read as naive so that DST never shifts a gap)."""
    if isinstance(value, (int, float)):
        return float(value) * unit
    text = str(value).strip()
    try:
        return float(text) * unit
    except ValueError:
        stamp = datetime.fromisoformat(text).replace(tzinfo=None)
        return (stamp - _EPOCH).total_seconds()
