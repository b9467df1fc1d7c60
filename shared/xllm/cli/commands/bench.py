"""`xllm bench serve`: load-test any OpenAI-compatible server (ours, vLLM, llama.cpp, ...).

    xllm bench serve --base-url http://127.0.0.1:8000 --workload random \\
        --input-len 64:256 --output-len 32 --num-requests 64 --concurrency 8 \\
        --slo-ttft 500 --slo-tpot 100 --result-json out.json --plot /tmp/plots

Workloads: `random`, `sharegpt`, a trace name (`azure-code`, `mooncake`, `burstgpt`,
`burstgpt-3`) or a CSV/JSONL trace file (see `xllm.cli.bench.traces`). Prints the summary as one
JSON line on stdout and a table on stderr.

`vllm bench serve`'s flag names work too: `--num-prompts` (= --num-requests),
`--max-concurrency` (= --concurrency), `--dataset-name` (= --workload), `--random-input-len`
/ `--random-output-len` (= --input-len / --output-len), `--save-result` with
`--result-filename` / `--result-dir` (= --result-json).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import urllib.request
from dataclasses import asdict
from pathlib import Path

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import Slo, format_table, summarize
from xllm.cli.bench.runner import BenchRun, LoadConfig, WarmupFailed, run_load
from xllm.cli.bench.traces import TRACE_FILES
from xllm.cli.bench.workloads import (
    BenchRequest,
    LengthRange,
    PromptMaker,
    random_workload,
    sharegpt_workload,
    trace_workload,
)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks (serve: load-test a server)")
    tools = bench.add_subparsers(dest="bench_command", required=True)
    p = tools.add_parser("serve", help=__doc__.splitlines()[0], description=__doc__)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    _server_args(p.add_argument_group("server"))
    _workload_args(p.add_argument_group("workload"))
    _load_args(p.add_argument_group("load"))
    _output_args(p.add_argument_group("output"))
    p.set_defaults(func=run)


def _server_args(g) -> None:
    g.add_argument("--base-url", default="http://127.0.0.1:8000", help="with or without /v1")
    g.add_argument("--endpoint", choices=("completions", "chat"), default="completions")
    g.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    g.add_argument("--api-key", default="", help="sent as a Bearer token")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into bodies")
    g.add_argument("--no-check-length", action="store_true", help="accept outputs of any length")


def _workload_args(g) -> None:
    names = ", ".join(TRACE_FILES)
    g.add_argument(
        "--workload",
        "--dataset-name",
        default="random",
        help=f"random, sharegpt, {names}, or a file",
    )
    g.add_argument(
        "--num-requests",
        "--num-prompts",
        type=int,
        default=None,
        help="default 64; traces: all",
    )
    g.add_argument(
        "--input-len",
        "--random-input-len",
        type=LengthRange.parse,
        default=LengthRange(128, 128),
        help="tokens, N or LOW:HIGH",
    )
    g.add_argument(
        "--output-len",
        "--random-output-len",
        type=LengthRange.parse,
        default=LengthRange(64, 64),
        help="tokens, N or LOW:HIGH",
    )
    g.add_argument("--tokenizer", default=None, help="HF tokenizer folder for exact prompts")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--time-scale", type=float, default=1.0, help="x inter-arrival times")
    g.add_argument("--length-scale", type=float, default=1.0, help="x trace lengths")
    g.add_argument("--trace-start", type=float, default=0.0, help="window start, trace seconds")
    g.add_argument("--trace-duration", type=float, default=None, help="window length, seconds")


def _load_args(g) -> None:
    g.add_argument(
        "--concurrency",
        "--max-concurrency",
        type=int,
        default=None,
        help="most requests in flight",
    )
    g.add_argument(
        "--request-rate", type=float, default=None, help="Poisson req/s; default: trace times"
    )
    g.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    g.add_argument("--warmup", type=int, default=1, help="untimed requests sent first")
    g.add_argument("--slo-ttft", type=float, default=None, help="TTFT SLO in ms, for goodput")
    g.add_argument("--slo-tpot", type=float, default=None, help="TPOT SLO in ms, for goodput")


def _output_args(g) -> None:
    g.add_argument("--result-json", default=None, help="write summary + per-request records")
    g.add_argument(
        "--save-result",
        action="store_true",
        help="write the result JSON (to --result-dir/--result-filename unless --result-json)",
    )
    g.add_argument("--result-filename", default=None, help="with --save-result")
    g.add_argument("--result-dir", default=".", help="with --save-result")
    g.add_argument("--plot", default=None, metavar="DIR", help="write PNG plots into DIR")
    g.add_argument("--no-progress", action="store_true")


def api_root(base_url: str) -> str:
    """`http://host:port[/v1][/]` → `http://host:port/v1`."""
    root = base_url.rstrip("/")
    return root if root.endswith("/v1") else root + "/v1"


def first_model(base_url: str, api_key: str = "") -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(base_url + "/models", headers=headers)
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)["data"][0]["id"]


def build_workload(args: argparse.Namespace) -> list[BenchRequest]:
    maker = PromptMaker(args.tokenizer, chat=args.endpoint == "chat", seed=args.seed)
    if args.workload == "random":
        n = args.num_requests or 64
        return random_workload(n, args.input_len, args.output_len, maker, args.seed)
    if args.workload == "sharegpt":
        return sharegpt_workload(args.num_requests or 64, args.output_len, maker, args.seed)
    return trace_workload(
        args.workload,
        maker,
        args.seed,
        limit=args.num_requests,
        start=args.trace_start,
        duration=args.trace_duration,
        time_scale=args.time_scale,
        length_scale=args.length_scale,
    )


def run(args: argparse.Namespace) -> int:
    base_url = api_root(args.base_url)
    try:
        model = args.model or first_model(base_url, args.api_key)
        requests = build_workload(args)
    except (OSError, ValueError, KeyError) as e:
        print(f"xllm bench serve: {e}", file=sys.stderr)
        return 2
    client = ClientConfig(
        base_url,
        model,
        chat=args.endpoint == "chat",
        api_key=args.api_key,
        temperature=args.temperature,
        check_length=not args.no_check_length,
        extra_body=args.extra_body,
    )
    load = LoadConfig(
        concurrency=args.concurrency,
        request_rate=args.request_rate,
        seed=args.seed,
        timeout=args.timeout,
        progress=not args.no_progress,
        warmup=args.warmup,
    )
    try:
        bench = run_load(requests, client, load)
    except WarmupFailed as e:
        print(f"xllm bench serve: {e}", file=sys.stderr)
        return 1
    summary = summarize(bench.records, bench.duration, Slo(args.slo_ttft, args.slo_tpot))
    print(format_table(summary), file=sys.stderr)
    print(json.dumps(summary.to_dict()))
    result_path = result_json_path(args, model)
    if result_path is not None:
        _write_result(result_path, args, model, summary.to_dict(), bench)
    if args.plot:
        from xllm.cli.bench.plots import write_plots

        paths = write_plots(bench.records, args.plot, title=f"{args.workload} on {model}")
        print(f"plots: {', '.join(map(str, paths))}", file=sys.stderr)
    return 0 if summary.completed else 1


def result_json_path(args: argparse.Namespace, model: str) -> Path | None:
    """Where the result JSON goes: --result-json, else vLLM's --save-result naming."""
    if args.result_json:
        return Path(args.result_json)
    if not args.save_result and not args.result_filename:
        return None
    name = args.result_filename or f"xllm-{args.workload}-{Path(model).name}.json"
    return Path(args.result_dir) / name


def _write_result(
    path: Path, args: argparse.Namespace, model: str, summary: dict, bench: BenchRun
) -> None:
    config = {k: _jsonable(v) for k, v in vars(args).items() if k != "func"}
    result = {
        "config": config | {"model": model},
        "summary": summary,
        "records": [asdict(r) | {"tpot": r.tpot, "e2e": r.e2e} for r in bench.records],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")


def _jsonable(value):
    if isinstance(value, LengthRange):
        return f"{value.low}:{value.high}"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value
