"""`xllm make-model --arch qwen3-moe / qwen2-moe`: hub-format MoE folders transformers loads."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from xllm.cli.commands import make_model as mm

MOE_ARCHS = ("qwen2-moe", "qwen3-moe")


def hub_to_transformers(ours: dict[str, torch.Tensor], num_experts: int) -> dict:
    """Our hub-format tensors with each layer's experts merged as transformers 5 holds them:
    `experts.gate_up_proj` [E, 2I, H] (gate rows, then up) and `experts.down_proj` [E, H, I]."""
    merged = {k: v for k, v in ours.items() if ".mlp.experts." not in k}
    layers = {k.split(".mlp.experts.")[0] for k in ours if ".mlp.experts." in k}
    for p in layers:
        e = range(num_experts)
        merged[f"{p}.mlp.experts.gate_up_proj"] = torch.stack(
            [
                torch.cat(
                    [
                        ours[f"{p}.mlp.experts.{j}.{proj}.weight"]
                        for proj in ("gate_proj", "up_proj")
                    ]
                )
                for j in e
            ]
        )
        merged[f"{p}.mlp.experts.down_proj"] = torch.stack(
            [ours[f"{p}.mlp.experts.{j}.down_proj.weight"] for j in e]
        )
    return merged


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_loads_in_transformers_with_our_weights(arch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir(arch)
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    assert type(model).__name__ == mm._HF_CLASS[arch]
    config = model.config
    theirs = model.state_dict()
    if config.tie_word_embeddings:
        theirs.pop("lm_head.weight")
    ours = hub_to_transformers(load_file(folder / "model.safetensors"), config.num_experts)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    block = model.model.layers[0].mlp
    assert config.model_type == arch.replace("-", "_")
    assert (config.num_experts, config.num_experts_per_tok) == (16, 4)
    assert config.norm_topk_prob is (arch == "qwen3-moe")
    if arch == "qwen2-moe":  # q/k/v bias and a gated shared expert, as Qwen1.5-MoE
        assert model.model.layers[0].self_attn.q_proj.bias is not None
        assert block.shared_expert.gate_proj.out_features == 256
    else:  # Qwen3's per-head q/k norms
        assert model.model.layers[0].self_attn.q_norm.weight.shape == (64,)


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routing_uses_every_expert_with_clear_margins(arch, tiny_model_dir):
    """The router's init gives top-k margins float32 noise cannot flip, starving no expert."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    router_logits = []
    for layer in model.model.layers:
        layer.mlp.gate.register_forward_hook(lambda m, i, out: router_logits.append(out[0]))
    ids = torch.randint(3, mm.TOKENIZER_VOCAB, (1, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
    for logits in router_logits:  # [64, E] per layer
        top = logits.softmax(dim=-1).topk(5, dim=-1).values  # the 4 chosen, the first left out
        assert (top[:, 3] - top[:, 4]).min() > 1e-5
        assert (top[:, 3] - top[:, 4]).median() > 1e-3
        assert len(set(logits.topk(4, dim=-1).indices.flatten().tolist())) == 16


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_small_keeps_qwen3_0_6b_attention_with_real_expert_counts(arch):
    c = mm.model_config(arch, "small")
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (
        1024, 16, 8, 128,
    )  # fmt: skip
    assert (c.num_experts, c.num_experts_per_tok) == ((128, 8) if arch == "qwen3-moe" else (60, 4))
    params = sum(math.prod(spec.shape) for spec in mm.tensor_specs(arch, c))
    assert 800e6 < params < 900e6  # ~1.7 GB in bfloat16
