"""Cost model of one engine step: FLOPs and bytes from a model config, time from a profile.

A step of our engine (`xllm.engine`) runs a flat batch: `num_decodes` sequences decoding one
token each at their context lengths, plus prefill chunks (`length` new tokens after
`context_len` cached ones). Its cost has three parts, each a roofline term:

  * linear layers: 2 FLOPs per weight per token; every weight is read once per step;
  * attention: 4·heads·head_dim FLOPs per (query, key) pair per layer; decodes read their
    whole context's K/V from the pool, prefill chunks with a context gather it once;
  * the LM head, only for rows that sample (decodes, and a prefill's last chunk).

`step_time` turns those into seconds with a `HardwareProfile`. Everything here is pure
arithmetic on plain values, so the simulator can call it millions of times.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from services.scheduler.sim.hardware import HardwareProfile

BUILTIN_MODELS = Path(__file__).parent / "models"
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1, "int8": 1}


@dataclass(frozen=True, slots=True)
class ModelShape:
    """The numbers of a Hugging Face config.json that set a step's cost."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype: str = "bfloat16"
    num_experts: int = 0
    """MoE: routed experts per layer (0 = dense MLP)."""
    experts_per_token: int = 0
    moe_intermediate: int = 0

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> ModelShape:
        heads = raw["num_attention_heads"]
        return cls(
            hidden=raw["hidden_size"],
            layers=raw["num_hidden_layers"],
            heads=heads,
            kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            intermediate=raw.get("intermediate_size", 0),
            vocab=raw["vocab_size"],
            dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
            num_experts=raw.get("num_experts", 0) or 0,
            experts_per_token=raw.get("num_experts_per_tok", 0) or 0,
            moe_intermediate=raw.get("moe_intermediate_size", 0) or 0,
        )

    @classmethod
    def load(cls, name_or_path: str | Path, dtype: str | None = None) -> ModelShape:
        """From a model folder, a config.json, or a built-in name (`qwen3-0.6b`)."""
        path = Path(name_or_path)
        if path.is_dir():
            path = path / "config.json"
        elif not path.is_file():
            path = BUILTIN_MODELS / f"{name_or_path}.json"
        if not path.is_file():
            builtin = sorted(p.stem for p in BUILTIN_MODELS.glob("*.json"))
            raise ValueError(f"no model config at {name_or_path!r}; built-in: {builtin}")
        shape = cls.from_config(json.loads(path.read_text()))
        return shape if dtype is None else _with_dtype(shape, dtype)

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype.removeprefix("torch."), 2)

    @property
    def attn_weights(self) -> int:
        """q, k, v, o projections of one layer."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q_out + 2 * kv_out) + q_out * self.hidden

    def mlp_weights(self, num_tokens: int) -> tuple[int, int]:
        """(weights each token multiplies, weights the step reads) of one layer's MLP."""
        if not self.num_experts:
            dense = 3 * self.hidden * self.intermediate
            return dense, dense
        expert = 3 * self.hidden * self.moe_intermediate
        touched = min(self.num_experts, num_tokens * self.experts_per_token)
        return self.experts_per_token * expert, touched * expert

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype_bytes


def _with_dtype(shape: ModelShape, dtype: str) -> ModelShape:
    from dataclasses import replace

    return replace(shape, dtype=dtype)


@dataclass(frozen=True, slots=True)
class StepShape:
    """What one engine step computes (what `Scheduler.schedule` returned)."""

    decode_context_lens: tuple[int, ...] = ()
    """Context of each decoding sequence, the new token included."""
    prefill_chunks: tuple[tuple[int, int], ...] = ()
    """(new tokens, cached context before them) of each prefill chunk."""
    num_prefill_samples: int = 0
    """Prefill chunks that finish their prompt this step, so they sample a token."""

    @property
    def num_seqs(self) -> int:
        return len(self.decode_context_lens) + len(self.prefill_chunks)

    @property
    def num_tokens(self) -> int:
        return len(self.decode_context_lens) + sum(n for n, _ in self.prefill_chunks)


@dataclass(frozen=True, slots=True)
class StepCost:
    """A step's work, split by the kernel that does it (so each part gets its own factor):
    GEMMs, prefill attention (SDPA over a chunk), decode attention (the paged kernel)."""

    linear_flops: float
    prefill_attn_flops: float
    decode_attn_flops: float
    weight_bytes: float
    kv_bytes: float
    num_seqs: int


def step_cost(model: ModelShape, step: StepShape) -> StepCost:
    n = step.num_tokens
    samples = len(step.decode_context_lens) + step.num_prefill_samples
    mlp_per_token, mlp_read = model.mlp_weights(n)
    per_layer = model.attn_weights + mlp_per_token
    lm_head = model.hidden * model.vocab
    linear_flops = 2.0 * (model.layers * per_layer * n + lm_head * samples)
    # (query, key) pairs: a decode attends its context; a chunk's token attends the context
    # and the chunk's tokens up to itself (causal).
    attn = 4.0 * model.layers * model.heads * model.head_dim
    prefill_pairs = sum(n * ctx + n * (n + 1) // 2 for n, ctx in step.prefill_chunks)
    weights_read = model.layers * (model.attn_weights + mlp_read) + (lm_head if samples else 0)
    kv_tokens_read = sum(step.decode_context_lens) + sum(ctx for _, ctx in step.prefill_chunks)
    kv_tokens_written = n
    return StepCost(
        linear_flops=linear_flops,
        prefill_attn_flops=attn * prefill_pairs,
        decode_attn_flops=attn * sum(step.decode_context_lens),
        weight_bytes=float(weights_read * model.dtype_bytes),
        kv_bytes=float((kv_tokens_read + kv_tokens_written) * model.kv_bytes_per_token),
        num_seqs=step.num_seqs,
    )


def step_time(model: ModelShape, step: StepShape, hw: HardwareProfile) -> float:
    """Seconds one step takes on `hw` (0 for an empty step)."""
    if step.num_seqs == 0:
        return 0.0
    return hw.time_of(step_cost(model, step), model.dtype)


def kv_transfer_time(model: ModelShape, num_tokens: int, hw: HardwareProfile) -> float:
    """Seconds to move `num_tokens` tokens of KV between instances (PD disaggregation)."""
    return hw.transfer_latency + num_tokens * model.kv_bytes_per_token / hw.interconnect_bw
