"""Shared by the benchmarks: the cached demo checkpoints and the JSON result line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

CACHE = Path(os.environ.get("XLLM_CACHE_DIR", Path.home() / ".cache" / "xllm")) / "models"


def demo_model(
    arch: str = "qwen3", size: str = "small", seed: int = 0, dtype: str = "bfloat16"
) -> Path:
    """A random-weight checkpoint made once and reused (~1.2 GB for `small`)."""
    from xllm.cli.commands.make_model import make_model

    out = CACHE / f"{arch}-{size}-{dtype}-seed{seed}"
    if not (out / "config.json").is_file():
        print(f"making {out} (once)...", file=sys.stderr)
        make_model(arch, size, out, seed=seed, dtype=dtype)
    return out


def random_prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=g).tolist()


def emit(result: dict) -> None:
    """The one machine-readable line every benchmark prints last."""
    print(json.dumps(result), flush=True)


def run_variants(
    command: list[str], variants: tuple[str, ...] = ("off", "on"), rounds: int = 1
) -> dict[str, list[dict]]:
    """Each variant in a process of its own (`command + [variant]`, which prints its result as
    its last stdout line), the variants alternated `rounds` times so that a machine's drift
    hits all of them alike; every result is echoed to stderr as it comes."""
    runs: dict[str, list[dict]] = {v: [] for v in variants}
    for _ in range(rounds):
        for variant in variants:
            out = subprocess.run([*command, variant], check=True, capture_output=True, text=True)
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps({variant: runs[variant][-1]}), file=sys.stderr, flush=True)
    return runs
