"""Load Hugging Face safetensors checkpoints into our modules, by name.

Every parameter must be filled exactly once and every checkpoint tensor must land
somewhere: a mismatch is an error naming the tensors, never a silently random weight.
Fused parameters (q|k|v, gate|up) are filled shard by shard via `PACKED_MODULES`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from xllm.models.layers import PACKED_MODULES
from xllm.models.moe import expert_weight_shard

# Checkpoint tensors that are buffers recomputed at init, not parameters.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.is_file():
        return [single]
    raise FileNotFoundError(
        f"{model_dir} has neither model.safetensors nor model.safetensors.index.json"
    )


def iter_checkpoint(model_dir: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def load_named_weights(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], skip: set[str] = frozenset()
) -> None:
    params = dict(model.named_parameters())
    loaded: dict[str, set[int]] = {name: set() for name in params}
    unexpected: list[str] = []
    for name, tensor in weights:
        if name in skip or name.endswith(IGNORED_SUFFIXES):
            continue
        target, shard = _resolve(name)
        param = params.get(target)
        if param is None:
            unexpected.append(name)
            continue
        _copy_shard(param, shard, tensor, name)
        loaded[target].add(shard)
    missing = [
        name
        for name, param in params.items()
        if len(loaded[name]) < len(getattr(param, "shard_sizes", [None]))
    ]
    if unexpected or missing:
        raise ValueError(
            "checkpoint does not match the model: "
            f"missing {_sample(missing)}, unexpected {_sample(unexpected)}"
        )


def _resolve(name: str) -> tuple[str, int]:
    expert = expert_weight_shard(name)  # MoE: expert j's projections are shards of one tensor
    if expert is not None:
        return expert
    for hf_name, (ours, shard) in PACKED_MODULES.items():
        if f".{hf_name}." in name:
            return name.replace(f".{hf_name}.", f".{ours}."), shard
    return name, 0


def _copy_shard(param: torch.Tensor, shard: int, tensor: torch.Tensor, name: str) -> None:
    sizes = getattr(param, "shard_sizes", None)
    dst = param.data
    if sizes is not None and len(sizes) > 1:
        offset = sum(sizes[:shard])
        dst = dst.narrow(0, offset, sizes[shard])
    if dst.shape != tensor.shape:
        raise ValueError(
            f"{name}: checkpoint shape {tuple(tensor.shape)}, model expects {tuple(dst.shape)}"
        )
    dst.copy_(tensor)


def _sample(names: list[str], limit: int = 8) -> str:
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more
