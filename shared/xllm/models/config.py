"""ModelConfig: the parts of a Hugging Face `config.json` our models read, in one typed place.

transformers 4.x writes `rope_theta` and `rope_scaling` at the top level; 5.x may write a
`rope_parameters` dict instead. Both are read here, so nothing else looks at raw keys.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    torch_dtype: torch.dtype
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise FileNotFoundError(
                f"{model_dir} has no config.json: not a Hugging Face model folder"
            )
        raw = json.loads(path.read_text())
        eos_ids = _eos_token_ids(Path(model_dir), raw)
        return cls.from_dict(raw, eos_ids)

    @classmethod
    def from_dict(cls, raw: dict[str, Any], eos_token_ids: tuple[int, ...] = ()) -> ModelConfig:
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ValueError("config.json names no `architectures`")
        heads = raw["num_attention_heads"]
        rope = raw.get("rope_parameters") or {}
        rope_scaling = raw.get("rope_scaling") or (
            rope if rope.get("rope_type", "default") != "default" else None
        )
        model_type = raw.get("model_type", "")
        return cls(
            architecture=architectures[0],
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            max_position_embeddings=raw.get("max_position_embeddings", 2048),
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
            rope_scaling=rope_scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            # Qwen2 always has q/k/v bias; Llama and Qwen3 say so with `attention_bias`.
            attention_bias=raw.get("attention_bias", model_type == "qwen2"),
            torch_dtype=parse_dtype(raw.get("torch_dtype") or raw.get("dtype") or "float32"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_token_ids or _as_tuple(raw.get("eos_token_id")),
            raw=raw,
        )


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (value,)


def _eos_token_ids(model_dir: Path, raw: dict[str, Any]) -> tuple[int, ...]:
    """EOS ids from generation_config.json (what generation stops on), else config.json."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        ids = _as_tuple(json.loads(path.read_text()).get("eos_token_id"))
        if ids:
            return ids
    return _as_tuple(raw.get("eos_token_id"))
