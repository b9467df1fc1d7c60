"""TEMPORARY: a minimal `load_trace` for azure-code and mooncake, with the signature of
`xllm.bench.traces` (being written in parallel). The simulator imports that module first
and falls back to this one; delete this file (and `xllm/sim/`) once `xllm.bench.traces`
is merged.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival: float
    input_len: int
    output_len: int
    hash_ids: tuple[int, ...] = ()
    session_id: str | None = None


FILES = {
    "azure-code": "AzureLLMInferenceTrace_code.csv.gz",
    "mooncake": "mooncake_conversation_trace.jsonl.gz",
}


def _data_dir() -> Path:
    here = Path(__file__).resolve()
    candidates = [Path(os.environ.get("XLLM_DATA_DIR", "/nonexistent"))]
    candidates += [p / "shared" / "data" for p in here.parents] + [p / "data" for p in here.parents]
    for c in candidates:
        if (c / FILES["azure-code"]).is_file():
            return c
    raise FileNotFoundError("trace data not found; set XLLM_DATA_DIR")


def _rows(path: Path) -> list[TraceRequest]:
    with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as f:
        if ".jsonl" in path.name:
            return [
                TraceRequest(
                    r["timestamp"] / 1e3,
                    r["input_length"],
                    r["output_length"],
                    tuple(r.get("hash_ids", ())),
                )
                for r in map(json.loads, f)
            ]
        out = []
        for r in csv.DictReader(f):
            t = datetime.fromisoformat(r["TIMESTAMP"][:26]).timestamp()
            out.append(TraceRequest(t, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
        return out


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
    path = _data_dir() / FILES[name_or_path] if name_or_path in FILES else Path(name_or_path)
    rows = sorted((r for r in _rows(path) if r.output_len > 0), key=lambda r: r.arrival)
    t0 = rows[0].arrival
    rows = [replace(r, arrival=r.arrival - t0) for r in rows]
    end = float("inf") if duration is None else start + duration
    rows = [r for r in rows if start <= r.arrival < end]
    if rows:
        t0 = rows[0].arrival
        rows = [replace(r, arrival=r.arrival - t0) for r in rows]
    rows = rows[:limit]
    return [
        replace(
            r,
            arrival=r.arrival * time_scale,
            input_len=max(min_len, round(r.input_len * length_scale)),
            output_len=max(min_len, round(r.output_len * length_scale)),
        )
        for r in rows
    ]
