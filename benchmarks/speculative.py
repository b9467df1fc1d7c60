"""Speculative decoding (ngram, suffix, draft): output tok/s with and without, one run.

Two workloads, each at every `--concurrency` (that many requests decoding together):

  * repetitive (code editing: the output largely copies its prompt): prompts built from the
    ShareGPT sample (/work/shared/data), each a user passage followed by its copy in
    progress, as an edit that rewrites a file; run on the loop-prone variant of the
    random-weight model (near-uniform attention, QK gain 1), whose greedy output falls into
    loops — random weights cannot copy a prompt the way a trained model does, so the loops
    stand in for the copying, and drafts are found and kept;
  * random: the ordinary random-weight model on random prompts — drafts are rare and
    mostly rejected, so speculation has nothing to win and must not lose.

Each cell runs the engine with speculation off, then for each of `--methods`: adaptive (the
default switch, what must never be slower than off) and forced on
(`--speculative-adaptive false`, what the switch protects against), on the same requests.
`--modes` picks which of off, adaptive and forced run (off is the baseline of the ratios:
without it a line has tok/s only), `--workloads` which workloads: a run can be cut down to
the cells in question (the full one takes ~20 min on the quiet machine). The draft model
(`--methods draft`) is `--draft-model` if given (a smaller checkpoint of the target's
vocabulary), else the target cut to its first `--draft-layers` layers (same embeddings and
head: a layer-skip draft, written once beside the target).

    .venv/bin/python benchmarks/speculative.py                       # small, 1,4,16
    .venv/bin/python benchmarks/speculative.py --modes off,adaptive --workloads random
    .venv/bin/python benchmarks/speculative.py --size tiny --concurrency 1,4 --output-len 64

Prints one JSON line per cell and method (tok/s of each mode run, the ratios adaptive / off
and forced / off, the acceptance rate when forced, the adaptive run's speculating and
exploration steps), then the summary line with `min_adaptive_ratio` over all cells and by
method, and `adaptive_ratios` (every cell's, keyed workload/concurrency/method).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import time
from pathlib import Path

from common import CACHE, demo_model, emit, random_prompts

from xllm.config import EngineConfig
from xllm.engine.engine import Engine
from xllm.models.config import ModelConfig
from xllm.protocol import SamplingParams
from xllm.tokenizer import Tokenizer

SHAREGPT = Path("/work/shared/data/ShareGPT_V3_filtered_1000.json.gz")
MODES = ("off", "adaptive", "forced")
WORKLOADS = ("repetitive", "random")


def loopy_model(arch: str, size: str, dtype: str):
    import xllm.cli.commands.make_model as make_model

    out = CACHE / f"{arch}-{size}-{dtype}-loopy"
    if not (out / "config.json").is_file():
        print(f"making {out} (once)...", file=sys.stderr)
        saved, make_model.QK_GAIN = make_model.QK_GAIN, 1.0
        try:
            make_model.make_model(arch, size, out, dtype=dtype)
        finally:
            make_model.QK_GAIN = saved
    return out


def truncated_model(model_dir: Path, num_layers: int) -> Path:
    """`model_dir` with only its first `num_layers` decoder layers (a checkpoint of the same
    vocabulary and a fraction of the cost: the draft for `--methods draft`)."""
    from safetensors.torch import load_file, save_file

    out = model_dir.with_name(f"{model_dir.name}-first{num_layers}")
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((model_dir / "config.json").read_text())
    config["num_hidden_layers"] = num_layers
    config["max_window_layers"] = min(config.get("max_window_layers", num_layers), num_layers)
    (out / "config.json").write_text(json.dumps(config))
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    tensors = load_file(model_dir / "model.safetensors")
    kept = {
        name: t
        for name, t in tensors.items()
        if not name.startswith("model.layers.") or int(name.split(".")[2]) < num_layers
    }
    save_file(kept, out / "model.safetensors", metadata={"format": "pt"})
    return out


def editing_prompts(model_dir, n: int, length: int) -> list[list[int]]:
    """ShareGPT passages as files being edited: the passage, then its copy begun (the
    output continues the copy)."""
    tokenizer = Tokenizer(model_dir)
    with gzip.open(SHAREGPT, "rt") as f:
        rows = json.load(f)
    passages = [row["conversations"][0]["value"] for row in rows if row["conversations"]]
    prompts: list[list[int]] = []
    for text in passages:
        ids = tokenizer.encode(text, add_special_tokens=False)[: length // 2]
        if len(ids) == length // 2:
            prompts.append((ids + ids[: length - len(ids)])[:length])
        if len(prompts) == n:
            return prompts
    raise ValueError(f"fewer than {n} ShareGPT passages of {length // 2} tokens")


def workload_prompts(kind: str, model_dir, n: int, length: int) -> list[list[int]]:
    if kind == "random":
        vocab = ModelConfig.from_dir(model_dir).vocab_size
        return random_prompts(n, length, vocab, seed=1)
    return editing_prompts(model_dir, n, length)


def run(model_dir, prompts, output_len: int, options: dict, dtype: str) -> tuple[float, dict]:
    """Output tok/s of `prompts` submitted together, after a warm-up on the same prompts
    (a few tokens each: every step shape, verifications included, is then no longer a
    first, and the adaptive switch has measurements, as in a server that has been up);
    and the speculation counters (the warm-up's included) and the timed run's steps."""
    longest = max(len(p) for p in prompts) + output_len + 32  # (+ drafts' slots)
    config = EngineConfig(
        model=str(model_dir),
        dtype=dtype,
        num_kv_blocks=len(prompts) * (longest // 16 + 2),  # just enough: no preemption
        max_model_len=longest,
        enable_prefix_caching=False,  # the warm-up must not shorten the timed prefills
        **options,
    )
    engine = Engine(config)
    generate(engine, prompts, 24, "warmup")
    policy = engine.speculation
    explored = policy.num_explorations if policy else 0
    steps = engine.step_stats.num_steps
    start = time.perf_counter()
    generated = generate(engine, prompts, output_len, "run", counts := {"on": 0})
    tok_s = generated / (time.perf_counter() - start)
    stats = engine.speculation_stats()
    return tok_s, {
        "drafts": stats.num_draft_tokens,
        "kept": stats.num_accepted_draft_tokens,
        "steps": engine.step_stats.num_steps - steps,
        "speculating_steps": counts["on"],
        "explorations": (policy.num_explorations - explored) if policy else 0,
    }


def generate(engine: Engine, prompts, output_len: int, tag: str, counts=None) -> int:
    """Tokens generated; `counts["on"]`: the steps the adaptive switch let speculate."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", prompt, params)
    generated = 0
    while engine.has_unfinished():
        generated += sum(len(d.token_ids) for d in engine.step())
        if counts is not None and engine.speculation and engine.speculation.speculating:
            counts["on"] += 1
    return generated


def method_options(method: str, model_dir: Path, args) -> dict:
    options: dict = {"speculative": method}
    if method == "draft":
        options["draft_model"] = args.draft_model or str(
            truncated_model(model_dir, args.draft_layers)
        )
    return options


def cell(model_dir, kind: str, concurrency: int, args) -> list[dict]:
    """One line per method: tok/s of each of `--modes` (off measured once for the cell)."""
    prompts = workload_prompts(kind, model_dir, concurrency, args.input_len)
    modes = args.modes.split(",")
    off = run(model_dir, prompts, args.output_len, {}, args.dtype)[0] if "off" in modes else 0.0
    lines = []
    for method in args.methods.split(","):
        options = method_options(method, model_dir, args)
        line: dict = {
            "benchmark": "speculative",
            "workload": kind,
            "concurrency": concurrency,
            "method": method,
        }
        if off:
            line["off_tok_s"] = round(off, 1)
        if "adaptive" in modes:
            adaptive, counts = run(model_dir, prompts, args.output_len, options, args.dtype)
            line["adaptive_tok_s"] = round(adaptive, 1)
            if off:
                line["adaptive_ratio"] = round(adaptive / off, 3)
            line["adaptive_steps"] = counts["steps"]
            line["adaptive_speculating_steps"] = counts["speculating_steps"]
            line["adaptive_explorations"] = counts["explorations"]
        if "forced" in modes:
            forced_options = {**options, "speculative_adaptive": False}
            forced, counts = run(model_dir, prompts, args.output_len, forced_options, args.dtype)
            kept, drafts = counts["kept"], counts["drafts"]  # (the warm-up's included)
            line["forced_tok_s"] = round(forced, 1)
            if off:
                line["forced_ratio"] = round(forced / off, 3)
            line["acceptance_rate"] = round(kept / drafts, 3) if drafts else 0.0
        emit(line)
        lines.append(line)
    return lines


def summary(cells: list[dict], args) -> dict:
    """The run's summary line: every cell's adaptive / off ratio, and their minimum."""
    rated = [c for c in cells if "adaptive_ratio" in c]
    methods = args.methods.split(",")
    line: dict = {
        "benchmark": "speculative",
        "summary": True,
        "model": f"{args.arch}-{args.size}-{args.dtype}",
        "output_len": args.output_len,
        "methods": args.methods,
        "modes": args.modes,
        "workloads": args.workloads,
        "adaptive_ratios": {
            f"{c['workload']}/{c['concurrency']}/{c['method']}": c["adaptive_ratio"] for c in rated
        },
    }
    if rated:
        line["min_adaptive_ratio"] = min(c["adaptive_ratio"] for c in rated)
        line["min_adaptive_ratio_by_method"] = {
            m: min(c["adaptive_ratio"] for c in rated if c["method"] == m) for m in methods
        }
    return line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="qwen3")
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated")
    parser.add_argument("--methods", default="ngram,suffix,draft", help="comma-separated")
    parser.add_argument("--draft-model", default="", help="checkpoint for --methods draft")
    parser.add_argument(
        "--draft-layers", type=int, default=4, help="else: the target's first layers as draft"
    )
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--modes", default="off,adaptive,forced", help="comma-separated: off,adaptive,forced"
    )
    parser.add_argument(
        "--workloads", default="repetitive,random", help="comma-separated: repetitive,random"
    )
    args = parser.parse_args()
    for name, value, known in (
        ("--modes", args.modes, MODES),
        ("--workloads", args.workloads, WORKLOADS),
    ):
        if not value or set(value.split(",")) - set(known):
            parser.error(f"{name} takes a comma-separated subset of {','.join(known)}")
    make = {
        "repetitive": lambda: loopy_model(args.arch, args.size, args.dtype),
        "random": lambda: demo_model(args.arch, args.size, dtype=args.dtype),
    }
    cells = []
    for kind in args.workloads.split(","):
        model_dir = make[kind]()
        for c in args.concurrency.split(","):
            cells += cell(model_dir, kind, int(c), args)
    emit(summary(cells, args))


if __name__ == "__main__":
    main()
