"""Trace parsing: each shipped trace against the figures in `shared/data/README.md`, the
scaling and window options, and the column detection for other CSV / JSONL files."""

from __future__ import annotations

import gzip
import json
from statistics import mean

import pytest

from xllm.cli.bench.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, data_dir, load_trace


@pytest.fixture(scope="module")
def traces() -> dict[str, list[TraceRequest]]:
    return {name: load_trace(name) for name in ("azure-code", "mooncake", "burstgpt", "burstgpt-3")}


def lengths(requests: list[TraceRequest]) -> tuple[float, int, int, float, int, int]:
    """(mean, min, max) of the input lengths, then of the output lengths."""
    i = [r.input_len for r in requests]
    o = [r.output_len for r in requests]
    return round(mean(i), 1), min(i), max(i), round(mean(o), 1), min(o), max(o)


def test_data_dir_holds_the_shipped_files():
    assert (data_dir() / "README.md").is_file()


def test_azure_code(traces):
    azure = traces["azure-code"]
    assert len(azure) == 8819
    assert azure[0] == TraceRequest(0.0, 4808, 10)  # 2023-11-16 18:17:03.9799600
    assert azure[1].arrival == pytest.approx(0.052)  # 18:17:04.0319600: 7 digits read
    assert azure[-1].arrival == pytest.approx(3435.95, abs=0.01)  # to 19:14:19.93
    assert lengths(azure) == (2047.8, 3, 7437, 27.9, 6, 1899)


def test_mooncake(traces):
    mooncake = traces["mooncake"]
    assert len(mooncake) == 12031
    assert mooncake[-1].arrival == pytest.approx(3536.999)  # milliseconds in the file
    assert lengths(mooncake) == (12035.1, 891, 126195, 342.6, 1, 2000)
    assert mooncake[0].hash_ids == tuple(range(14))
    assert round(mean(len(r.hash_ids) for r in mooncake), 1) == 24.0
    assert all(r.hash_ids[0] == 0 for r in mooncake)  # the shared system-prompt block
    block = MOONCAKE_BLOCK_TOKENS
    assert all(
        (len(r.hash_ids) - 1) * block < r.input_len <= len(r.hash_ids) * block for r in mooncake
    )


def test_burstgpt_drops_the_failed_rows(traces):
    burst = traces["burstgpt"]
    assert len(burst) == 400 - 17  # failures have 0 response tokens
    assert burst[0] == TraceRequest(0.0, 472, 18)  # the row at t = 5 s
    assert burst[-1].arrival == 37269.0
    assert lengths(burst)[0::3] == (543.6, 288.8)  # the README's "without failures" means
    assert all(r.session_id is None for r in burst)


def test_burstgpt_3_sessions(traces):
    burst = traces["burstgpt-3"]
    assert len(burst) == 399
    assert burst[-1].arrival == 41453.0
    assert lengths(burst)[0::3] == (618.9, 171.3)
    assert max(r.input_len for r in burst) == 25085
    sessions = [r.session_id for r in burst if r.session_id]
    # 394 session rows in 135 sessions; the one failure was a single-turn session's row.
    assert (len(sessions), len(set(sessions))) == (393, 134)
    assert max(sessions.count(s) for s in set(sessions)) == 24


def test_time_and_length_scaling():
    plain = load_trace("burstgpt", limit=20)
    scaled = load_trace("burstgpt", limit=20, time_scale=0.5, length_scale=0.1, min_len=4)
    for p, s in zip(plain, scaled, strict=True):
        assert s.arrival == pytest.approx(p.arrival * 0.5)
        assert s.input_len == max(4, round(p.input_len * 0.1))
        assert s.output_len == max(4, round(p.output_len * 0.1))
    assert min(r.output_len for r in scaled) == 4  # clamped
    with pytest.raises(ValueError, match="positive"):
        load_trace("burstgpt", time_scale=0)


def test_window_and_limit_rebase_to_the_first_request_kept(traces):
    azure = traces["azure-code"]
    window = load_trace("azure-code", start=600.0, duration=60.0)
    expected = [r for r in azure if 600.0 <= r.arrival < 660.0]
    assert len(window) == len(expected) > 0
    assert window[0].arrival == 0.0
    shift = expected[0].arrival
    assert [r.arrival for r in window] == pytest.approx([r.arrival - shift for r in expected])
    assert len(load_trace("azure-code", start=600.0, duration=60.0, limit=5)) == 5


def test_generic_csv_with_millisecond_column(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("arrival_ms,prompt_tokens,completion_tokens\n2000,10,5\n1000,20,7\n")
    assert load_trace(str(path)) == [TraceRequest(0.0, 20, 7), TraceRequest(1.0, 10, 5)]


def test_generic_gzipped_jsonl(tmp_path):
    path = tmp_path / "t.jsonl.gz"
    rows = [
        {"time": 3.5, "input_tokens": 9, "output_tokens": 2},
        {"time": 4.0, "input_tokens": 1, "output_tokens": 1},
    ]
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    assert load_trace(str(path)) == [TraceRequest(0.0, 9, 2), TraceRequest(0.5, 1, 1)]


def test_generic_json_array(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps([{"arrival_time": 0, "prompt_len": 4, "output_len": 2}]))
    assert load_trace(str(path)) == [TraceRequest(0.0, 4, 2)]


def test_a_mooncake_shaped_file_reads_as_mooncake(tmp_path):
    path = tmp_path / "agent.jsonl"
    row = {"timestamp": 1500, "input_length": 600, "output_length": 3, "hash_ids": [0, 1]}
    path.write_text(json.dumps(row) + "\n" + json.dumps(row | {"timestamp": 4500}) + "\n")
    requests = load_trace(str(path))
    assert [r.arrival for r in requests] == [0.0, 3.0]
    assert requests[0].hash_ids == (0, 1)


def test_unknown_columns_get_an_error_naming_them(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("when,a,b\n1,2,3\n")
    with pytest.raises(ValueError, match=r"found: when, a, b"):
        load_trace(str(path))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(FileNotFoundError, match="azure-code, mooncake"):
        load_trace("no-such-trace")
