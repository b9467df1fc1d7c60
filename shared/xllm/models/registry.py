"""Which module implements a checkpoint's `architectures` entry, and building it loaded."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from xllm.models.config import ModelConfig
from xllm.models.layers import Linear
from xllm.models.loader import iter_checkpoint

ARCHITECTURES = {
    "LlamaForCausalLM": "xllm.models.llama",
    "Qwen2ForCausalLM": "xllm.models.qwen2",
    "Qwen3ForCausalLM": "xllm.models.qwen3",
    "Qwen2VLForConditionalGeneration": "xllm.models.qwen2_vl",
    "Qwen2MoeForCausalLM": "xllm.models.qwen2_moe",
    "Qwen3MoeForCausalLM": "xllm.models.qwen3_moe",
}


def model_class(architecture: str) -> type[nn.Module]:
    module = ARCHITECTURES.get(architecture)
    if module is None:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(ARCHITECTURES)}"
        )
    return getattr(importlib.import_module(module), architecture)


def load_model(
    model_dir: str | Path, config: ModelConfig, dtype: torch.dtype, device: torch.device
) -> nn.Module:
    cls = model_class(config.architecture)
    with torch.device(device):
        model = cls(config, dtype)
    model.load_weights(iter_checkpoint(model_dir))
    for module in model.modules():
        if isinstance(module, Linear):
            module.prepare()
    return model.eval()
