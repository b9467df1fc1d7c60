"""ModelConfig: a model's shape and the parts of a Hugging Face `config.json` we read, typed.

The one description of a model's shape: the engine builds its layers from it, the
simulator's cost model counts FLOPs and bytes from it (`attn_weights`, `mlp_weights`,
`kv_bytes_per_token`), and `xllm make-model` writes checkpoints from it.

transformers 4.x writes `rope_theta` and `rope_scaling` at the top level; 5.x may write a
`rope_parameters` dict instead. Both are read here, so nothing else looks at raw keys.
Importing this module does not import torch (the simulator runs without it); only
`torch_dtype` and `parse_dtype` do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

DTYPE_NAMES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}
"""The dtype names (and aliases) a checkpoint's weights may have -> torch's name."""
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}
"""Bytes per element; the 8-bit ones for simulated deployments (`dataclasses.replace`)."""


def dtype_name(name: str) -> str:
    """torch's name of a dtype name or alias (`torch.` prefix allowed); ValueError if
    unknown."""
    try:
        return DTYPE_NAMES[name.removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(DTYPE_NAMES)}") from None


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    return getattr(torch, dtype_name(name))


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    architecture: str
    """The Hugging Face class (`Qwen3ForCausalLM`): which of our models runs it."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """The dense MLP's width (MoE models: see `moe_intermediate_size`)."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    dtype: str = "float32"
    """The weights' dtype, by torch's name (`bfloat16`); `torch_dtype` is the torch object."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_experts: int = 0
    """MoE: routed experts per layer (0 = dense MLP)."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    """MoE: renormalise the chosen experts' router probabilities to sum to 1 (Qwen3-MoE)."""
    shared_expert_intermediate_size: int = 0
    """MoE: width of the always-on shared expert (Qwen2-MoE; 0 = none)."""
    decoder_sparse_step: int = 1
    """MoE: every this many layers is sparse (layer i when (i + 1) % step == 0)..."""
    mlp_only_layers: tuple[int, ...] = ()
    """...except these, which keep the dense MLP."""
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)

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
        # Multimodal configs saved by transformers 5 nest the language model's keys.
        raw = {**raw, **raw["text_config"]} if isinstance(raw.get("text_config"), dict) else raw
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
            # Qwen2 and Qwen2-VL always have q/k/v bias, Qwen2-MoE by `qkv_bias` (default on);
            # Llama and Qwen3 say so with `attention_bias`.
            attention_bias=raw.get(
                "attention_bias",
                raw.get(
                    "qkv_bias", model_type in ("qwen2", "qwen2_moe", "qwen2_vl", "qwen2_vl_text")
                ),
            ),
            dtype=dtype_name(str(raw.get("torch_dtype") or raw.get("dtype") or "float32")),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_token_ids or _as_tuple(raw.get("eos_token_id")),
            num_experts=raw.get("num_experts") or 0,
            num_experts_per_tok=raw.get("num_experts_per_tok") or 0,
            moe_intermediate_size=raw.get("moe_intermediate_size") or 0,
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            shared_expert_intermediate_size=raw.get("shared_expert_intermediate_size") or 0,
            decoder_sparse_step=raw.get("decoder_sparse_step") or 1,
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            raw=raw,
        )

    # -- sizes (what a step reads and computes; the simulator's cost model) ----------------

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 2)

    @property
    def attn_weights(self) -> int:
        """Weights of one layer's q, k, v and o projections."""
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        return self.hidden_size * (q_out + 2 * kv_out) + q_out * self.hidden_size

    def is_sparse_layer(self, index: int) -> bool:
        """Whether decoder layer `index` has routed experts (else the dense MLP), as
        transformers decides it."""
        return (
            self.num_experts > 0
            and index not in self.mlp_only_layers
            and (index + 1) % self.decoder_sparse_step == 0
        )

    def mlp_weights(self, num_tokens: int) -> tuple[int, int]:
        """(weights each token multiplies, weights a step of `num_tokens` reads) of one
        layer's MLP: all of them when dense, the experts the tokens are routed to for MoE."""
        if not self.num_experts:
            dense = 3 * self.hidden_size * self.intermediate_size
            return dense, dense
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        shared = 3 * self.hidden_size * self.shared_expert_intermediate_size  # Qwen2-MoE's
        touched = min(self.num_experts, num_tokens * self.num_experts_per_tok)
        return self.num_experts_per_tok * expert + shared, touched * expert + shared

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers, in `dtype`."""
        return (
            2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * self.dtype_bytes
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
