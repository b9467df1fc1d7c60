"""`xllm make-model`: Hugging Face checkpoint folders with random weights, made locally.

Tests and benchmarks need real-looking checkpoints of the architectures we serve, but nothing
can be downloaded from the hub. This module writes a folder that `transformers` loads with
`AutoModelForCausalLM.from_pretrained(dir)` / `AutoTokenizer.from_pretrained(dir)` fully
offline, while itself needing only torch and `tokenizers` (transformers is only a test
dependency: weights are written by name, never by instantiating a model).

Files written:

* `config.json` - a real HF config for `LlamaForCausalLM`, `Qwen2ForCausalLM`,
  `Qwen3ForCausalLM`, `Qwen2MoeForCausalLM` or `Qwen3MoeForCausalLM` (MoE experts written as
  on the hub, one tensor per expert and projection), or `Qwen2VLForConditionalGeneration`
  (what that adds, including the image processor's `preprocessor_config.json`, is in
  make_vl_model.py). RoPE is written in BOTH spellings with identical values, so the folder
  round-trips in transformers 4.x (which reads `rope_theta` + `rope_scaling`) and 5.x (which
  reads `rope_parameters`, and prefers `rope_scaling` over it when both are present):

  - `rope_theta` (float, top level) and `rope_scaling` (`null`, or the llama3 dict for llama);
  - `rope_parameters` = `{"rope_type": "default" | "llama3", "rope_theta": ..., <llama3 keys>}`.

  Our own loader should read `rope_parameters` when present and otherwise fall back to
  `rope_theta` / `rope_scaling` (real checkpoints on the hub use the old spelling).
  Likewise the dtype is written as both `torch_dtype` (4.x) and `dtype` (5.x). `head_dim` is
  always explicit, also for qwen2 whose config class has no such field (its attention reads it
  with `getattr`). Qwen2's q/k/v biases are implied by the architecture, as on the hub: there
  is no `attention_bias` key for qwen2.
* `generation_config.json` - bos/pad = `<|endoftext|>`, eos = [`<|im_end|>`, `<|endoftext|>`],
  greedy by default.
* `model.safetensors` - written by us, tensor by tensor, with exactly HF's tensor names
  (`lm_head.weight` only when embeddings are untied). Deterministic for a given seed; the
  values are drawn in float32 and then cast, so the bfloat16 model of a seed is the rounded
  float32 model of the same seed.
* `tokenizer.json` / `tokenizer_config.json` - a byte-level BPE (~4,000 tokens) trained here on
  text from Python's standard library, with the special tokens `<|endoftext|>`,
  `<|im_start|>`, `<|im_end|>` appended after the learned vocabulary (as Qwen does) and a
  ChatML chat template. Training is deterministic (same text => same tokenizer.json in any
  process); the text, and so the merges, may differ between Python versions, the vocabulary
  size and hence the weights' shapes and bytes do not. `tokenizer_class` is `PreTrainedTokenizerFast` so that transformers
  uses tokenizer.json verbatim (v5's `Qwen2Tokenizer` would rebuild the pipeline and add an
  NFC normalizer, and our tokenization must match transformers' exactly).

Sizes: `tiny` is ~1.5-2.5M parameters (CPU tests); `small` has exactly Qwen3-0.6B's shapes
for every dense architecture (benchmarks), and its embedding, like real Qwen's, is much larger
than the tokenizer. The MoE archs keep those attention shapes with the real models' expert
counts (`_MOE_SHAPES`); their `small` has 12 layers (~840M parameters, 1.7 GB in bfloat16).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import struct
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xllm.cli.commands import make_vl_model as vl
from xllm.models.config import ModelConfig

ARCHS = ("llama", "qwen2", "qwen3", "qwen2-vl", "qwen2-moe", "qwen3-moe")
SIZES = ("tiny", "small")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_HF_CLASS = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2-moe": "Qwen2MoeForCausalLM",
    "qwen3-moe": "Qwen3MoeForCausalLM",
}
_SAFETENSORS_DTYPE = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

# --------------------------------------------------------------------------------------------
# Init scales, chosen by measuring greedy decoding in transformers on the tiny models (float32,
# 8 prompts x 32 new tokens per arch). The aims: the top-1/top-2 logit gap is not microscopic,
# so two implementations pick the same greedy tokens, and decoding does not lock onto one
# token, so token-for-token comparisons actually compare something.
#
# * LOGIT_STD: embeddings and lm_head are N(0, LOGIT_STD / sqrt(hidden)). The final RMSNorm
#   gives the last hidden state an RMS of ~1, so logits are ~N(0, LOGIT_STD) at any width.
#   With 4: median top-1/top-2 gap ~0.8, 5th percentile ~0.08, smallest of 256 steps ~0.002,
#   against float32 eager-vs-sdpa logit differences of <1e-4 (HF's own init, std 0.02, gives
#   logits with std ~0.2 and gaps ~17x smaller).
# * QK_GAIN: attention scores have a spread of ~QK_GAIN (q and k weights are each scaled by
#   sqrt(QK_GAIN); qwen3 normalizes q and k, so there its q/k norm weights are centred on
#   sqrt(QK_GAIN) instead of 1). At 1 attention is nearly uniform, so every position sees the
#   same context average and decoding falls into loops (llama: 11-26 distinct tokens of 32,
#   runs of up to 11 copies); at 3 it is about 29/32 distinct with no runs.
# * RESIDUAL_GAIN scales o_proj and down_proj. With tied embeddings (qwen3) the input token's
#   own embedding scores ||e||^2 against itself, so a random model repeats its input: at gains
#   (1, 1) qwen3 emitted 1-3 distinct tokens in 32. Layer outputs 3x larger drown that echo;
#   with QK_GAIN 3 qwen3 gives 23-32 distinct tokens, longest run 5.
# * Norm weights are 1 + NORM_NOISE * N(0, 1) and biases N(0, BIAS_STD), so that a loader
#   that skips them (or applies them wrongly) produces visibly different logits.
#
# bfloat16 is another matter: its rounding noise flips the near-ties that any random model
# has, so even transformers' eager and sdpa attention in bfloat16 agree on only 0-32 greedy
# tokens. Compare implementations token for token in float32.
LOGIT_STD = 4.0
QK_GAIN = 3.0
RESIDUAL_GAIN = 3.0
NORM_NOISE = 0.1
BIAS_STD = 0.2
# * ROUTER_GAIN scales the MoE router: its logits are ~N(0, ROUTER_GAIN), so the top-k experts
#   win by clear margins (a near-tie between the k-th and (k+1)-th expert would let float32
#   noise pick a different expert than transformers does), yet every expert gets tokens.
ROUTER_GAIN = 2.0

# MoE shapes, from the real configs: Qwen3-30B-A3B routes each token to 8 of 128 experts and
# renormalises their weights; Qwen1.5-MoE-A2.7B (Qwen2-MoE) to 4 of 60, unnormalised, plus a
# shared expert 4x an expert's width, gated by a sigmoid. tiny keeps the ratios at CPU-test
# size (16 experts); small keeps small's dense shapes with the real expert counts.
_MOE_SHAPES = {
    ("qwen3-moe", "tiny"): dict(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64),
    ("qwen2-moe", "tiny"): dict(
        num_experts=16, num_experts_per_tok=4, moe_intermediate_size=64,
        shared_expert_intermediate_size=256,
    ),
    ("qwen3-moe", "small"): dict(
        num_experts=128, num_experts_per_tok=8, moe_intermediate_size=128, num_hidden_layers=12
    ),
    ("qwen2-moe", "small"): dict(
        num_experts=60, num_experts_per_tok=4, moe_intermediate_size=256,
        shared_expert_intermediate_size=1024, num_hidden_layers=12,
    ),
}  # fmt: skip

# --------------------------------------------------------------------------------------------
# Tokenizer

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
TOKENIZER_VOCAB = 4000  # learned tokens + the special tokens

# Qwen2's pre-tokenizer split: words with a leading space, single digits, punctuation runs.
_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Standard-library sources that exist in every CPython since 3.8: prose-heavy code with
# docstrings and comments. Files missing on some interpreter are skipped; the corpus is large
# enough that the vocabulary always fills up, so the model's shapes never depend on it.
_CORPUS_MODULES = (
    "argparse.py", "calendar.py", "configparser.py", "contextlib.py", "csv.py",
    "dataclasses.py", "difflib.py", "doctest.py", "email/message.py", "enum.py",
    "fractions.py", "functools.py", "gettext.py", "heapq.py", "inspect.py", "json/decoder.py",
    "json/encoder.py", "locale.py", "logging/__init__.py", "pprint.py", "random.py",
    "shutil.py", "statistics.py", "string.py", "subprocess.py", "textwrap.py", "threading.py",
    "typing.py", "unittest/case.py",
)  # fmt: skip

# ChatML, as Qwen writes it. Content may be a string or a list of OpenAI-style parts.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}"
    "{{- message['content'] }}"
    "{%- else %}"
    "{%- for part in message['content'] %}"
    "{%- if part['type'] == 'text' %}{{- part['text'] }}{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)


def _tokenizer_corpus() -> list[str]:
    """The training text: the language reference's prose plus some stdlib sources."""
    try:
        from pydoc_data.topics import topics  # the text behind `help("keywords")` etc.
    except ImportError:  # some distributions strip it; the sources below suffice
        topics = {}
    texts = [topics[key] for key in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in _CORPUS_MODULES:
        path = stdlib / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8"))
    return texts


@functools.cache
def _trained_tokenizer_json() -> str:
    """Train the BPE once per process (about a second) and return it serialized."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    # No normalizer: decode(encode(text)) must give back `text` byte for byte.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_PRETOKENIZE_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB - len(SPECIAL_TOKENS),
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable
        show_progress=False,
    )
    # Deterministic: ties between equally frequent pairs are broken by token id (checked:
    # processes with different hash seeds write identical tokenizer.json files).
    tokenizer.train_from_iterator(_tokenizer_corpus(), trainer=trainer)
    # Added after training so that they get the last ids, as in Qwen's vocabulary.
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    if tokenizer.get_vocab_size() != TOKENIZER_VOCAB:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, corpus too small?")
    return tokenizer.to_str()


def _special_token_ids() -> dict[str, int]:
    added = json.loads(_trained_tokenizer_json())["added_tokens"]
    return {token["content"]: token["id"] for token in added}


def _write_tokenizer(out: Path, model_max_length: int, arch: str) -> None:
    tokenizer_json = _trained_tokenizer_json()
    special_tokens, chat_template = SPECIAL_TOKENS, CHAT_TEMPLATE
    if arch == "qwen2-vl":
        tokenizer_json = vl.add_vision_tokens(tokenizer_json)
        special_tokens += vl.VISION_TOKENS
        chat_template = vl.chat_template(CHAT_TEMPLATE)
    (out / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    ids = _special_token_ids() | vl.vision_token_ids(tokenizer_json)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "additional_special_tokens": [IM_START, IM_END],
        "added_tokens_decoder": {
            str(ids[token]): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token in special_tokens
        },
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "errors": "replace",
        "model_max_length": model_max_length,
        "split_special_tokens": False,
    }
    _write_json(out / "tokenizer_config.json", config)


# --------------------------------------------------------------------------------------------
# Shapes and config


def model_config(arch: str, size: str, dtype: str = "bfloat16") -> ModelConfig:
    """The config of the `arch`/`size` checkpoint: `config.json` and `generation_config.json`
    are written from it, and `ModelConfig.from_dir` reads the folder back as this value."""
    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"unknown model {arch!r}/{size!r}: arch in {ARCHS}, size in {SIZES}")
    if arch == "qwen2-vl":
        shape = vl.text_shape(size)
        rope_original_max_positions = 0
    elif size == "small":  # exactly Qwen3-0.6B
        shape = dict(
            hidden_size=1024,
            num_hidden_layers=28,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=128,
            intermediate_size=3072,
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_theta=1e6,
            tie_word_embeddings=True,
        )
        rope_original_max_positions = 8192
    else:
        shape = dict(
            hidden_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA
            head_dim=64 if arch.startswith("qwen3") else 32,  # Qwen3: heads * head_dim != hidden
            intermediate_size=384,
            vocab_size=math.ceil(TOKENIZER_VOCAB / 64) * 64,
            max_position_embeddings=4096,
            rope_theta=10000.0,  # short tests see many distinct rotations
            # untied llama/qwen2 exercise lm_head.weight
            tie_word_embeddings=arch.startswith("qwen3"),
        )
        # llama3 RoPE scaling's pre-training context; below max_positions so that it matters.
        rope_original_max_positions = 256
    shape |= _MOE_SHAPES.get((arch, size), {})
    if arch == "qwen3-moe":
        shape["norm_topk_prob"] = True
    ids = _special_token_ids()
    return ModelConfig(
        architecture=_HF_CLASS[arch],
        **shape,
        rms_norm_eps=1e-6,
        rope_scaling=_rope_scaling(arch, rope_original_max_positions, shape["head_dim"]),
        # implied by the architecture, as on the hub
        attention_bias=arch in ("qwen2", "qwen2-vl", "qwen2-moe"),
        dtype=dtype,
        bos_token_id=ids[ENDOFTEXT],
        eos_token_ids=(ids[IM_END], ids[ENDOFTEXT]),  # what generation stops on
    )


def _rope_scaling(arch: str, original_max_positions: int, head_dim: int) -> dict | None:
    if arch == "qwen2-vl":
        return {"type": "mrope", "mrope_section": vl.mrope_section(head_dim)}
    if arch != "llama":
        return None
    return {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": original_max_positions,
    }


def build_config(arch: str, config: ModelConfig) -> dict:
    """`config.json` of `config`, with the keys transformers' class for `arch` expects."""
    config_json = {
        "architectures": [config.architecture],
        "model_type": arch.replace("-", "_"),
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "rope_scaling": config.rope_scaling,
        "rope_parameters": {
            "rope_type": "default",
            **(config.rope_scaling or {}),
            "rope_theta": config.rope_theta,
        },
        "tie_word_embeddings": config.tie_word_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": config.eos_token_ids[0],
        "torch_dtype": config.dtype,
        "dtype": config.dtype,
        "initializer_range": 0.02,
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if arch == "llama":
        config_json |= {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    else:
        config_json |= {"use_sliding_window": False, "sliding_window": None}
        config_json |= {"max_window_layers": config.num_hidden_layers}
    if arch in ("qwen3", "qwen3-moe"):
        config_json["attention_bias"] = False
    if arch == "qwen2-vl":
        vision_ids = vl.vision_token_ids(vl.add_vision_tokens(_trained_tokenizer_json()))
        config_json |= vl.config_extras(size_of(config), config.hidden_size, vision_ids)
    if config.num_experts:
        config_json |= {
            "num_experts": config.num_experts,
            "num_experts_per_tok": config.num_experts_per_tok,
            "moe_intermediate_size": config.moe_intermediate_size,
            "norm_topk_prob": config.norm_topk_prob,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        }
    if arch == "qwen2-moe":
        config_json |= {
            "shared_expert_intermediate_size": config.shared_expert_intermediate_size,
            "qkv_bias": True,
        }
    return config_json


def _generation_config(config: ModelConfig) -> dict:
    return {
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids),
        "pad_token_id": _special_token_ids()[ENDOFTEXT],
        "do_sample": False,
    }


# --------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    kind: str  # "embed", "linear", "qk", "residual", "norm", "qk_norm", "bias" or "router"


def tensor_specs(arch: str, config: ModelConfig) -> list[TensorSpec]:
    """HF's tensor names and shapes, in the order their values are drawn."""
    h, head_dim, vocab = config.hidden_size, config.head_dim, config.vocab_size
    q_dim = config.num_attention_heads * head_dim
    kv_dim = config.num_key_value_heads * head_dim
    mlp = config.intermediate_size
    specs = [TensorSpec("model.embed_tokens.weight", (vocab, h), "embed")]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        specs += [
            TensorSpec(p + "input_layernorm.weight", (h,), "norm"),
            TensorSpec(p + "self_attn.q_proj.weight", (q_dim, h), "qk"),
            TensorSpec(p + "self_attn.k_proj.weight", (kv_dim, h), "qk"),
            TensorSpec(p + "self_attn.v_proj.weight", (kv_dim, h), "linear"),
        ]
        if arch in ("qwen2", "qwen2-vl", "qwen2-moe"):
            specs += [
                TensorSpec(p + "self_attn.q_proj.bias", (q_dim,), "bias"),
                TensorSpec(p + "self_attn.k_proj.bias", (kv_dim,), "bias"),
                TensorSpec(p + "self_attn.v_proj.bias", (kv_dim,), "bias"),
            ]
        if arch in ("qwen3", "qwen3-moe"):
            specs += [
                TensorSpec(p + "self_attn.q_norm.weight", (head_dim,), "qk_norm"),
                TensorSpec(p + "self_attn.k_norm.weight", (head_dim,), "qk_norm"),
            ]
        specs += [
            TensorSpec(p + "self_attn.o_proj.weight", (h, q_dim), "residual"),
            TensorSpec(p + "post_attention_layernorm.weight", (h,), "norm"),
        ]
        if config.is_sparse_layer(i):
            specs += _moe_specs(p + "mlp.", config)
        else:
            specs += _mlp_specs(p + "mlp.", h, mlp)
    specs.append(TensorSpec("model.norm.weight", (h,), "norm"))
    if not config.tie_word_embeddings:
        specs.append(TensorSpec("lm_head.weight", (vocab, h), "embed"))
    if arch == "qwen2-vl":
        specs = [TensorSpec(vl.language_model_name(s.name), s.shape, s.kind) for s in specs]
        vision = vl.vision_config(size_of(config), h)
        specs += [TensorSpec(*spec) for spec in vl.vision_tensor_specs(vision)]
    return specs


def size_of(config: ModelConfig) -> str:
    """Which size a config was made as (a multimodal checkpoint's vision tower follows it)."""
    return "small" if config.num_hidden_layers > 4 else "tiny"


def _mlp_specs(prefix: str, hidden: int, intermediate: int) -> list[TensorSpec]:
    return [
        TensorSpec(prefix + "gate_proj.weight", (intermediate, hidden), "linear"),
        TensorSpec(prefix + "up_proj.weight", (intermediate, hidden), "linear"),
        TensorSpec(prefix + "down_proj.weight", (hidden, intermediate), "residual"),
    ]


def _moe_specs(prefix: str, config: ModelConfig) -> list[TensorSpec]:
    """A sparse layer's router, experts (as on the hub: one tensor per expert and projection)
    and, for Qwen2-MoE, the shared expert and its gate."""
    h = config.hidden_size
    specs = [TensorSpec(prefix + "gate.weight", (config.num_experts, h), "router")]
    for j in range(config.num_experts):
        specs += _mlp_specs(f"{prefix}experts.{j}.", h, config.moe_intermediate_size)
    if config.shared_expert_intermediate_size:
        specs += _mlp_specs(prefix + "shared_expert.", h, config.shared_expert_intermediate_size)
        specs.append(TensorSpec(prefix + "shared_expert_gate.weight", (1, h), "linear"))
    return specs


def init_tensor(spec: TensorSpec, generator: torch.Generator) -> torch.Tensor:
    """Draw one tensor in float32 (the scales are explained at the top of the module)."""
    x = torch.randn(spec.shape, generator=generator)
    if spec.kind == "norm":
        return x.mul_(NORM_NOISE).add_(1.0)
    if spec.kind == "qk_norm":  # qwen3 normalizes q and k: their norm weights set the scale
        return x.mul_(NORM_NOISE).add_(1.0).mul_(math.sqrt(QK_GAIN))
    if spec.kind == "bias":
        return x.mul_(BIAS_STD)
    fan_in = math.prod(spec.shape[1:])  # a conv kernel's too
    if spec.kind == "embed":
        x.mul_(LOGIT_STD / math.sqrt(fan_in))
        # Rows past the tokenizer's vocabulary are zero, like the never-trained padding rows
        # of real checkpoints: they score exactly 0, so greedy decoding never emits an id the
        # tokenizer cannot decode (small's 151,936 rows would otherwise win ~97% of the time).
        x[TOKENIZER_VOCAB:] = 0.0
        return x
    gain = {
        "linear": 1.0,
        "qk": math.sqrt(QK_GAIN),
        "residual": RESIDUAL_GAIN,
        "router": ROUTER_GAIN,
    }[spec.kind]
    return x.mul_(gain / math.sqrt(fan_in))


def _write_safetensors(path: Path, specs: list[TensorSpec], seed: int, dtype: torch.dtype) -> None:
    """Stream tensors into a safetensors file, one at a time (small is ~1.2 GB in bf16).

    `safetensors.torch.save_file` wants every tensor in memory at once and then copies each
    to bytes; the format is simple enough to write directly: an 8-byte little-endian header
    length, a JSON header with each tensor's dtype, shape and byte range, then the raw data.
    """
    if sys.byteorder != "little":  # safetensors data is little-endian; so is every target
        raise RuntimeError("make_model needs a little-endian machine")
    item = torch.empty((), dtype=dtype).element_size()
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        size = math.prod(spec.shape) * item
        header[spec.name] = {
            "dtype": _SAFETENSORS_DTYPE[dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # the data must start 8-byte aligned

    generator = torch.Generator().manual_seed(seed)
    tmp = path.with_name(path.name + ".partial")  # never leave a truncated checkpoint behind
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for spec in specs:
            tensor = init_tensor(spec, generator).to(dtype).contiguous()
            f.write(tensor.view(torch.uint8).numpy())  # a view, not a copy
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Entry points


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def make_model(
    arch: str, size: str, out: str | Path, seed: int = 0, dtype: str = "bfloat16"
) -> Path:
    """Write a random-weight HF checkpoint folder for `arch`/`size` into `out`; return it."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {tuple(DTYPES)}")
    config = model_config(arch, size, dtype)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", build_config(arch, config))
    _write_json(out / "generation_config.json", _generation_config(config))
    _write_tokenizer(out, config.max_position_embeddings, arch)
    if arch == "qwen2-vl":
        _write_json(out / "preprocessor_config.json", vl.preprocessor_config(size))
    specs = tensor_specs(arch, config)
    _write_safetensors(out / "model.safetensors", specs, seed, DTYPES[dtype])
    return out


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "make-model",
        help="write a random-weight Hugging Face checkpoint folder",
        description="Write a Hugging Face checkpoint folder with random weights, made locally.",
    )
    parser.add_argument("--arch", choices=ARCHS, required=True)
    parser.add_argument("--size", choices=SIZES, required=True)
    parser.add_argument("--out", required=True, help="output folder (created if missing)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    out = make_model(args.arch, args.size, args.out, seed=args.seed, dtype=args.dtype)
    print(
        f"wrote {args.arch}/{args.size} ({args.dtype}) to {out} in {time.perf_counter() - start:.1f}s"
    )
    return 0
