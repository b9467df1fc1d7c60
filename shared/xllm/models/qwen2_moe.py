"""Qwen2-MoE (Qwen1.5-MoE): Qwen2's attention (q/k/v bias) with routed experts plus a
sigmoid-gated shared expert on its sparse layers (the block in moe.py)."""

from __future__ import annotations

import torch
from torch import nn

from xllm.models.config import ModelConfig
from xllm.models.llama import LlamaDecoderLayer
from xllm.models.moe import sparse_or_dense_mlp
from xllm.models.qwen2 import Qwen2ForCausalLM


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, config: ModelConfig, dtype: torch.dtype, index: int) -> nn.Module:
        return sparse_or_dense_mlp(config, dtype, index)


class Qwen2MoeForCausalLM(Qwen2ForCausalLM):
    layer_cls = Qwen2MoeDecoderLayer
