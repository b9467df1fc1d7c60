"""Qwen3-MoE: Qwen3's attention (per-head q/k RMSNorm) with routed experts in place of the
dense MLP on its sparse layers (the block in moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from xllm.models.config import ModelConfig
from xllm.models.moe import sparse_or_dense_mlp
from xllm.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM


class Qwen3MoeDecoderLayer(Qwen3DecoderLayer):
    def make_mlp(self, config: ModelConfig, dtype: torch.dtype, index: int) -> nn.Module:
        return sparse_or_dense_mlp(config, dtype, index)


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    layer_cls = Qwen3MoeDecoderLayer
