"""`xllm make-model`: the folders load in transformers, with the features each arch promises."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from xllm.cli.commands import make_model as mm
from xllm.models.config import ModelConfig

ARCHS = tuple(arch for arch in mm.ARCHS if arch != "qwen2-vl")  # qwen2-vl: test_make_vl_model.py
DENSE_ARCHS = tuple(arch for arch in ARCHS if not arch.endswith("-moe"))
"""MoE archs have their own version of the dense-only tests in test_make_model_moe.py."""


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    """hf_model(arch) -> the transformers model of the tiny float32 folder, loaded once."""
    from transformers import AutoModelForCausalLM

    cache = {}

    def load(arch):
        if arch not in cache:
            model, info = AutoModelForCausalLM.from_pretrained(
                tiny_model_dir(arch), output_loading_info=True
            )
            assert not any(info.values()), info  # no missing / unexpected / mismatched keys
            cache[arch] = model.eval()
        return cache[arch]

    return load


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir("qwen3"))


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_loads_in_transformers_with_our_weights(arch, tiny_model_dir, hf_model):
    from transformers import AutoTokenizer

    model = hf_model(arch)
    assert type(model).__name__ == mm._HF_CLASS[arch]
    ours = load_file(tiny_model_dir(arch) / "model.safetensors")
    theirs = model.state_dict()
    if model.config.tie_word_embeddings:
        assert "lm_head.weight" not in ours
        theirs.pop("lm_head.weight")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir(arch))
    assert len(tokenizer) == mm.TOKENIZER_VOCAB
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tokenizer)


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_config_round_trips_arch_features(arch, tiny_model_dir, hf_model):
    from transformers import AutoConfig

    folder = tiny_model_dir(arch)
    raw = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)
    model = hf_model(arch)
    layer = model.model.layers[0].self_attn

    assert config.model_type == arch and config.hidden_act == "silu"
    assert config.head_dim == raw["head_dim"] == (64 if arch == "qwen3" else 32)
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    # Both spellings of RoPE agree, and transformers reads back the same values.
    assert raw["rope_parameters"]["rope_theta"] == raw["rope_theta"] == 10000.0
    assert config.rope_parameters["rope_theta"] == raw["rope_theta"]
    assert config.tie_word_embeddings is (arch == "qwen3")
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is (arch == "qwen3")

    if arch == "llama":
        scaling = raw["rope_scaling"]
        assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
        assert scaling["original_max_position_embeddings"] < config.max_position_embeddings
        assert {k: config.rope_parameters[k] for k in scaling} == scaling
        assert model.model.rotary_emb.rope_type == "llama3"
        assert config.attention_bias is False and layer.q_proj.bias is None
    else:
        assert raw["rope_scaling"] is None and config.rope_parameters["rope_type"] == "default"
    if arch == "qwen2":
        for proj in (layer.q_proj, layer.k_proj, layer.v_proj):
            assert proj.bias is not None and proj.bias.abs().mean() > 0.05
    if arch == "qwen3":
        assert layer.q_proj.out_features != config.hidden_size  # heads * head_dim != hidden
        assert not torch.equal(layer.q_norm.weight, torch.ones_like(layer.q_norm.weight))
        assert layer.k_norm.weight.shape == (config.head_dim,)


def test_norms_and_padding_rows(tiny_model_dir):
    weights = load_file(tiny_model_dir("qwen3") / "model.safetensors")
    norm = weights["model.norm.weight"]
    assert abs(norm.mean().item() - 1) < 0.05 and 0.05 < norm.std().item() < 0.2
    # Rows past the tokenizer are zero: greedy decoding never emits an undecodable id.
    embed = weights["model.embed_tokens.weight"]
    assert embed[mm.TOKENIZER_VOCAB :].abs().sum() == 0
    assert embed[: mm.TOKENIZER_VOCAB].abs().min(dim=1).values.gt(0).all()


def test_generation_config(tiny_model_dir, hf_tokenizer):
    folder = tiny_model_dir("llama")
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    im_end, endoftext = hf_tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert generation["eos_token_id"] == [im_end, endoftext]
    assert config["eos_token_id"] == hf_tokenizer.eos_token_id == im_end
    assert config["bos_token_id"] == generation["pad_token_id"] == endoftext


def test_chat_template_renders(hf_tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "🙂"}],
        },
    ]
    rendered = hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert rendered == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi 🙂<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    assert without == rendered.removesuffix("<|im_start|>assistant\n")
    # Special tokens are single ids, and the tokenizer adds no BOS of its own.
    ids = hf_tokenizer(rendered).input_ids
    assert ids[0] == hf_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(hf_tokenizer.eos_token_id) == 2


UNICODE_SAMPLES = [
    "Hello, world!",
    "  leading and trailing spaces  \n\ttabs\r\n",
    "Grüße, naïve café — 你好，世界 — こんにちは — Привет — مرحبا — 🙂👍🏽🇩🇪",
    "e\u0301 (not NFC) and \u00e9 (NFC), ﬁ ligature, zero\u200bwidth",
    "def f(x):\n    return x ** 2  # 12345678901234567890\n",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_transformers_tokenizer_round_trips(hf_tokenizer, text):
    assert hf_tokenizer.decode(hf_tokenizer(text).input_ids) == text


@pytest.fixture(scope="module")
def raw_tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_str(mm._trained_tokenizer_json())


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text=st.text(max_size=200))
def test_tokenizer_round_trips_any_text(raw_tokenizer, text):
    # Special-token strings in the text become special ids: keep them when decoding.
    ids = raw_tokenizer.encode(text).ids
    assert raw_tokenizer.decode(ids, skip_special_tokens=False) == text


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_is_not_degenerate(arch, hf_model, hf_tokenizer):
    model = hf_model(arch)
    prompt = hf_tokenizer("The quick brown fox jumps over", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, prompt.shape[1] :].tolist()
    assert len(tokens) == 32
    assert len(set(tokens)) > 12, tokens
    assert max(tokens) < mm.TOKENIZER_VOCAB  # padding rows never win
    logits = torch.stack(out.scores)[:, 0, : mm.TOKENIZER_VOCAB]
    assert 3 < logits.std(dim=-1).mean() < 5  # ~N(0, LOGIT_STD)
    top2 = logits.topk(2, dim=-1).values
    assert (top2[:, 0] - top2[:, 1]).median() > 0.2


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    def made(name, seed, dtype="float32"):
        return mm.make_model("qwen2", "tiny", tmp_path / name, seed=seed, dtype=dtype)

    a, b, c = made("a", 0), made("b", 0), made("c", 1)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()
    # Values are drawn in float32 and then cast: the bf16 model is the rounded float32 one.
    bf16 = load_file(made("d", 0, "bfloat16") / "model.safetensors")
    f32 = load_file(a / "model.safetensors")
    assert all(torch.equal(bf16[name], f32[name].to(torch.bfloat16)) for name in f32)


def test_cli_writes_the_folder(tmp_path):
    parser = argparse.ArgumentParser()
    mm.add_parser(parser.add_subparsers())
    out = tmp_path / "m"
    args = parser.parse_args(["make-model", "--arch", "llama", "--size", "tiny", "--out", str(out)])
    assert args.func(args) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["dtype"] == "bfloat16"
    assert not list(out.glob("*.partial"))


@pytest.mark.parametrize("arch", DENSE_ARCHS)
def test_small_has_qwen3_0_6b_shapes(arch):
    # Shapes only: making `small` writes 1.2 GB, which is for benchmarks, not unit tests.
    c = mm.model_config(arch, "small")
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (1024, 28, 16)
    assert (c.num_key_value_heads, c.head_dim) == (8, 128)
    assert (c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (3072, 151936, 40960)
    assert c.tie_word_embeddings
    params = sum(math.prod(spec.shape) for spec in mm.tensor_specs(arch, c))
    assert 590e6 < params < 600e6
    assert "lm_head.weight" not in {spec.name for spec in mm.tensor_specs(arch, c)}


@pytest.mark.parametrize("arch", ARCHS)
def test_the_folder_reads_back_as_the_config_it_was_written_from(arch, tiny_model_dir):
    """One model-shape type: what make-model writes is what the engine reads."""
    assert ModelConfig.from_dir(tiny_model_dir(arch)) == mm.model_config(arch, "tiny", "float32")
