"""Llama (and the family built on it): decoder layers of GQA attention + SwiGLU MLP.

Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) differ only in the attention block;
their files subclass the pieces here. Module names mirror the Hugging Face checkpoint, so
weights load by name (`load_weights`), with q/k/v and gate/up fused on the way in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from xllm.models.attention import AttentionMetadata, PagedAttention
from xllm.models.config import ModelConfig
from xllm.models.layers import GatedMLP, Linear, RMSNorm, RotaryEmbedding, apply_rotary
from xllm.models.loader import load_named_weights


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        self.qkv_proj = Linear(
            config.hidden_size,
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d],
            bias=config.attention_bias,
            dtype=dtype,
        )
        self.o_proj = Linear(self.num_heads * d, config.hidden_size, dtype=dtype)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, d)

    def project_qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n, d = x.shape[0], self.head_dim
        q, k, v = self.qkv_proj(x).split(
            [self.num_heads * d, self.num_kv_heads * d, self.num_kv_heads * d], dim=-1
        )
        return q.view(n, -1, d), k.view(n, -1, d), v.view(n, -1, d)  # [N, H|Hkv, D]

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        q, k, v = self.project_qkv(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        return self.o_proj(self.attn(q, k, v, meta))  # [N, hidden]


class LlamaDecoderLayer(nn.Module):
    attention_cls: type[LlamaAttention] = LlamaAttention

    def __init__(self, config: ModelConfig, dtype: torch.dtype, index: int = 0):
        super().__init__()
        self.self_attn = self.attention_cls(config, dtype)
        self.mlp = self.make_mlp(config, dtype, index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def make_mlp(self, config: ModelConfig, dtype: torch.dtype, index: int) -> nn.Module:
        """Layer `index`'s MLP (MoE models override this)."""
        return GatedMLP(config.hidden_size, config.intermediate_size, dtype)

    def forward(self, x, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype, layer_cls: type[LlamaDecoderLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, dtype=dtype, _freeze=True
        )
        self.layers = nn.ModuleList(
            layer_cls(config, dtype, index) for index in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.rotary = RotaryEmbedding(
            config.head_dim,
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            dtype,
        )

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [N, hidden]
        cos, sin = self.rotary(positions)  # [N, 1, D]
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    layer_cls: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, dtype, self.layer_cls)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [N] -> final hidden states [N, hidden]."""
        return self.model(input_ids, positions, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [R, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        load_named_weights(self, weights, skip=skip)
