"""Qwen3: Llama-style layers whose attention RMS-normalises each head of q and k before RoPE."""

from __future__ import annotations

import torch

from xllm.models.attention import AttentionMetadata
from xllm.models.config import ModelConfig
from xllm.models.layers import RMSNorm, apply_rotary
from xllm.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__(config, dtype)
        self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)

    def forward(self, x, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = self.project_qkv(x)  # [N, H|Hkv, D]
        q, k = apply_rotary(q, cos, sin, self.q_norm), apply_rotary(k, cos, sin, self.k_norm)
        return self.o_proj(self.attn(q, k, v, meta))


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_cls = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_cls = Qwen3DecoderLayer
