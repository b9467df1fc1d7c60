"""Shared by the benchmarks: the cached demo checkpoints and the JSON result line."""

from __future__ import annotations

import json
import os
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
