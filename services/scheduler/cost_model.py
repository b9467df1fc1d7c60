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
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from xllm.hardware import StepCost
from xllm.models.config import ModelConfig

if TYPE_CHECKING:
    from xllm.hardware import HardwareProfile

BUILTIN_MODELS = Path(__file__).parent / "model_configs"


def load_model_config(name_or_path: str | Path, dtype: str | None = None) -> ModelConfig:
    """From a model folder, a config.json, or a built-in name (`qwen3-0.6b`); `dtype`
    overrides the config's (8-bit ones included: see `xllm.models.config.DTYPE_BYTES`)."""
    path = Path(name_or_path)
    if path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        path = BUILTIN_MODELS / f"{name_or_path}.json"
    if not path.is_file():
        builtin = sorted(p.stem for p in BUILTIN_MODELS.glob("*.json"))
        raise ValueError(f"no model config at {name_or_path!r}; built-in: {builtin}")
    config = ModelConfig.from_dict(json.loads(path.read_text()))
    return config if dtype is None else replace(config, dtype=dtype)


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


def step_cost(model: ModelConfig, step: StepShape) -> StepCost:
    n = step.num_tokens
    samples = len(step.decode_context_lens) + step.num_prefill_samples
    mlp_per_token, mlp_read = model.mlp_weights(n)
    per_layer = model.attn_weights + mlp_per_token
    layers = model.num_hidden_layers
    lm_head = model.hidden_size * model.vocab_size
    linear_flops = 2.0 * (layers * per_layer * n + lm_head * samples)
    # (query, key) pairs: a decode attends its context; a chunk's token attends the context
    # and the chunk's tokens up to itself (causal).
    attn = 4.0 * layers * model.num_attention_heads * model.head_dim
    prefill_pairs = sum(n * ctx + n * (n + 1) // 2 for n, ctx in step.prefill_chunks)
    weights_read = layers * (model.attn_weights + mlp_read) + (lm_head if samples else 0)
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


def step_time(model: ModelConfig, step: StepShape, hw: HardwareProfile) -> float:
    """Seconds one step takes on `hw` (0 for an empty step)."""
    if step.num_seqs == 0:
        return 0.0
    return hw.time_of(step_cost(model, step), model.dtype)


def kv_transfer_time(model: ModelConfig, num_tokens: int, hw: HardwareProfile) -> float:
    """Seconds to move `num_tokens` tokens of KV between instances (PD disaggregation)."""
    return hw.transfer_latency + num_tokens * model.kv_bytes_per_token / hw.interconnect_bw
