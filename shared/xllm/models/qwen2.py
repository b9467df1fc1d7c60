"""Qwen2: Llama with a bias on the q/k/v projections (set by `ModelConfig.attention_bias`)."""

from __future__ import annotations

from xllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
