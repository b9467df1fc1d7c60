"""Our server vs llama.cpp's `llama-server`: same weights, same workload, one run.

    PYTHONPATH=shared:. .venv/bin/python benchmarks/vs_llama_cpp.py [--llama-server PATH]

The Qwen3-0.6B-shaped `small` demo model in bfloat16 is served by `llama-server` (the model
converted to a bf16 GGUF; llama.cpp fetched from PyPI's `llama-cpp-python` sdist and built
once, see `llama_cpp.py`), then by `xllm up`, never both at once. Each gets the same random
token-id prompts through `xllm.cli.bench` (streamed `/v1/completions`, exact output lengths):

  * c16: 16 requests of 512 input / 128 output tokens, all 16 at once;
  * c1:  a few requests of 512 / 128, one at a time.

Before timing, the GGUF is checked against our engine: greedy tokens of `llama-server` vs our
in-process `LLM` on one short prompt, in bf16 and in fp32 (an f32 GGUF, made once too).

llama.cpp collapses when another job competes for the cores (see `OtherCpu`), so each
scenario waits for the other processes on the machine to go quiet, and is run again with new
prompts when they did not stay quiet during it.

Prints one JSON line: output tok/s, TTFT and TPOT means of both servers per scenario, the
ratios ours / llama.cpp, the greedy agreement, and per scenario the load average before it
and the share of the cores other processes used during it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import llama_cpp
from common import demo_model, emit

from xllm.cli.bench.client import ClientConfig
from xllm.cli.bench.report import summarize
from xllm.cli.bench.runner import LoadConfig, run_load
from xllm.cli.bench.workloads import LengthRange, PromptMaker, random_workload
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.cli.commands.bench import first_model

MARGIN = 64
"""Context tokens per llama-server slot beyond prompt + output (it counts a few extra)."""


def load_average() -> float:
    return round(os.getloadavg()[0], 2)


class OtherCpu:
    """The share of the machine's cores that processes outside this benchmark's process tree
    (other people's jobs) used since this object was made.

    llama.cpp's threads wait for each other at every op by spinning, so a job competing for
    the 2 cores slows it by orders of magnitude (32 ms per decode step alone, ~2 s beside
    one 2-thread job): the load average alone cannot tell a quiet run from a spoilt one.
    """

    def __init__(self):
        self.start = self._sample()

    def share(self) -> float:
        (t0, busy0, mine0), (t1, busy1, mine1) = self.start, self._sample()
        ticks = (t1 - t0) * os.sysconf("SC_CLK_TCK") * os.cpu_count()
        return round(max(0, (busy1 - busy0) - (mine1 - mine0)) / ticks, 3)

    @staticmethod
    def _sample() -> tuple[float, int, int]:
        cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait
        return time.monotonic(), busy, _tree_ticks(os.getpid())


def _tree_ticks(root: int) -> int:
    """CPU ticks (user + system) of `root` and all its descendants."""
    parent, ticks = {}, {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process just exited
            continue
        pid = int(stat.parent.name)
        parent[pid], ticks[pid] = int(fields[1]), int(fields[11]) + int(fields[12])
    mine, frontier = {root}, [root]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier and p not in mine]
        mine.update(children)
        frontier = children
    return sum(ticks.get(p, 0) for p in mine)


def wait_for_quiet(max_share: float, timeout: float) -> float:
    """Wait (up to `timeout` s) until other processes use at most `max_share` of the cores
    over 5 s; the share seen last."""
    deadline = time.monotonic() + timeout
    while True:
        cpu = OtherCpu()
        time.sleep(5)
        share = cpu.share()
        if share <= max_share or time.monotonic() > deadline:
            return share
        llama_cpp.log(f"other jobs use {share:.0%} of the cores: waiting for quiet...")


def get_json(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"llama-server exited ({process.returncode}); see {log}")
        try:
            get_json(url, timeout=5)
            return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)  # 503 while the model loads, refused before it listens
    raise TimeoutError(f"llama-server not healthy after {timeout} s; see {log}")


@contextmanager
def llama_server(binary: Path, gguf: Path, slots: int, slot_context: int, threads: int):
    """`llama-server` on a free port, continuous batching over `slots` parallel slots;
    yields its root URL. Its log goes to a temporary file."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="llama-server-")) / "server.log"
    argv = [
        binary, "--model", gguf, "--host", "127.0.0.1", "--port", str(port),
        "--parallel", str(slots), "--ctx-size", str(slots * slot_context),
        "--cont-batching", "--threads", str(threads), "--threads-batch", str(threads),
    ]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        root = f"http://127.0.0.1:{port}"
        wait_healthy(root + "/health", process, log)
        yield root
    finally:
        process.terminate()
        process.wait(30)


@contextmanager
def xllm_server(model_dir: Path, threads: int, extra_args: list[str]):
    """`xllm up` (one PD-colocated instance, bf16); yields its root URL."""
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        log_dir=tempfile.mkdtemp(prefix="xllm-vs-llama-"),
        log_level="WARNING",
    )
    engine_args = ["--dtype", "bfloat16", "--num-threads", str(threads), *extra_args]
    with serving_cluster(config, engine_args) as cluster:
        cluster.wait_ready(600)
        yield config.base_url.removesuffix("/v1")


def measure(root: str, requests: list, concurrency: int) -> dict:
    """One scenario through `xllm.cli.bench`: the figures we compare, from its summary."""
    base_url = root + "/v1"
    client = ClientConfig(base_url, first_model(base_url))
    load = LoadConfig(concurrency=concurrency, progress=False)
    before, cpu = load_average(), OtherCpu()
    run = run_load(requests, client, load)
    s = summarize(run.records, run.duration)
    return {
        "output_tok_s": round(s.output_throughput, 2),
        "ttft_mean_ms": round(s.ttft_ms.mean, 1),
        "tpot_mean_ms": round(s.tpot_ms.mean, 1),
        "duration_s": round(s.duration_s, 1),
        "failed": s.failed,
        "load_before": before,
        "others_cpu": cpu.share(),
    }


def run_scenarios(root: str, scenarios: dict, args) -> dict:
    """Each scenario on a quiet machine; run again (up to `--retries` times) when other
    processes took more than `--max-others` of the cores during it. A rerun gets new
    prompts: both servers cache prefixes, and the first attempt's would all hit."""
    maker = PromptMaker(args.model_dir, chat=False)
    lengths = LengthRange.parse(str(args.input_len)), LengthRange.parse(str(args.output_len))
    figures = {}
    for name, (n, concurrency, seed) in scenarios.items():
        for attempt in range(1 + args.retries):
            requests = random_workload(n, *lengths, maker, seed=seed + 1000 * attempt)
            wait_for_quiet(args.max_others, args.quiet_wait)
            figures[name] = measure(root, requests, concurrency) | {"attempt": attempt}
            if figures[name]["others_cpu"] <= args.max_others:
                break
    return figures


def greedy_llama(root: str, prompt: list[int], n: int) -> list[int]:
    """Greedy ids from llama-server's native `/completion` (the OpenAI route returns text only)."""
    body = {
        "prompt": prompt,
        "n_predict": n,
        "samplers": ["top_k"],
        "top_k": 1,  # argmax, with no other sampler in the chain
        "ignore_eos": True,
        "cache_prompt": False,
        "return_tokens": True,
    }
    return get_json(root + "/completion", body)["tokens"]


def greedy_ours(model_dir: Path, prompt: list[int], n: int, dtype: str, threads: int) -> list[int]:
    from xllm.llm import LLM
    from xllm.protocol.types import SamplingParams

    params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
    llm = LLM(str(model_dir), dtype=dtype, num_threads=threads)
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def check_gguf(binary: Path, model_dir: Path, dtype: str, args) -> dict:
    """How many leading greedy tokens llama-server on the GGUF of `dtype` shares with our
    engine in the same dtype, on one 16-token prompt."""
    prompt = PromptMaker(model_dir, chat=False).ids_for(16, random.Random(7))
    gguf = llama_cpp.gguf(model_dir, dtype)
    with llama_server(binary, gguf, 1, 16 + args.check_tokens + MARGIN, args.threads) as root:
        theirs = greedy_llama(root, prompt, args.check_tokens)
    torch_dtype = {"bf16": "bfloat16", "f32": "float32"}[dtype]
    ours = greedy_ours(model_dir, prompt, args.check_tokens, torch_dtype, args.threads)
    pairs = enumerate(zip(ours, theirs, strict=True))
    return {
        "tokens": len(ours),
        "leading_agree": next((i for i, (a, b) in pairs if a != b), len(ours)),
    }


def ratios(ours: dict, theirs: dict) -> dict:
    keys = ("output_tok_s", "ttft_mean_ms", "tpot_mean_ms")
    return {k: round(ours[k] / theirs[k], 3) if theirs[k] else None for k in keys}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", type=Path, help="an existing binary; default: build")
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--streams", type=int, default=16, help="concurrency of scenario c16")
    parser.add_argument("--single-requests", type=int, default=3, help="requests of c1")
    parser.add_argument("--threads", type=int, default=2, help="compute threads of each server")
    parser.add_argument(
        "--check-dtypes", default="bf16,f32", help="greedy checks to run (bf16, f32; '' = none)"
    )
    parser.add_argument("--check-tokens", type=int, default=32)
    parser.add_argument(
        "--max-others", type=float, default=0.1, help="most share of the cores other jobs may use"
    )
    parser.add_argument("--quiet-wait", type=float, default=600, help="seconds to wait for it")
    parser.add_argument("--retries", type=int, default=2, help="reruns of a disturbed scenario")
    parser.add_argument("--xllm-args", default="", help="extra engine flags for our instance")
    args = parser.parse_args()

    model_dir = args.model_dir = demo_model("qwen3", "small")
    binary = args.llama_server or llama_cpp.server_binary()
    gguf = llama_cpp.gguf(model_dir, "bf16")
    checks = {
        d: check_gguf(binary, model_dir, d, args)
        for d in filter(None, args.check_dtypes.split(","))
    }

    # name: (requests, concurrency, prompt seed)
    scenarios = {
        f"c{args.streams}": (args.streams, args.streams, 1),
        "c1": (args.single_requests, 1, 2),
    }
    slot_context = args.input_len + args.output_len + MARGIN

    with llama_server(binary, gguf, args.streams, slot_context, args.threads) as root:
        theirs = run_scenarios(root, scenarios, args)
    with xllm_server(model_dir, args.threads, args.xllm_args.split()) as root:
        ours = run_scenarios(root, scenarios, args)

    emit(
        {
            "benchmark": "vs_llama_cpp",
            "model": "qwen3-small-bf16",
            "llama_cpp_python": llama_cpp.LLAMA_CPP_PYTHON,
            "llama_cpp_commit": llama_cpp.commit(),
            "input_len": args.input_len,
            "output_len": args.output_len,
            "threads": args.threads,
            "greedy_check": checks,
            "scenarios": {
                name: {
                    "xllm": ours[name],
                    "llama_cpp": theirs[name],
                    "ratio": ratios(ours[name], theirs[name]),
                }
                for name in scenarios
            },
        }
    )


if __name__ == "__main__":
    main()
