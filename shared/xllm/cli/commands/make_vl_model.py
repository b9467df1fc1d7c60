"""What `xllm make-model --arch qwen2-vl` adds to a text checkpoint (make_model.py).

* `config.json`: the language model's keys at the top level (as the hub's Qwen2-VL
  checkpoints have them; transformers 5 reads that layout too), M-RoPE as
  `rope_scaling = {"type": "mrope", "mrope_section": ...}` (and `rope_parameters`), a
  `vision_config`, and the ids of the vision special tokens.
* the vision tower's tensors, named `model.visual.*` (and the language model's
  `model.language_model.*`), as transformers 5 writes them;
* the tokenizer gains `<|vision_start|>`, `<|vision_end|>`, `<|image_pad|>` and
  `<|video_pad|>` after the text special tokens, and a chat template that renders an image
  part as `<|vision_start|><|image_pad|><|vision_end|>` (one pad per image; the processor,
  or our engine, expands it to the image's token count);
* `preprocessor_config.json` for `AutoProcessor` (Qwen2VLImageProcessor; pixel limits small
  for `tiny` so that test images stay a few dozen tokens).

Sizes: `tiny` has a 2-block vision tower of width 64; `small` Qwen2-VL-2B's vision tower
(32 blocks of width 1280) in front of a language model of Qwen3-0.6B's size.
"""

from __future__ import annotations

import json

VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"
VISION_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD)

IMAGE_PART = (
    "{%- elif part['type'] in ('image', 'image_url') %}"
    "{{- '" + VISION_START + IMAGE_PAD + VISION_END + "' }}"
)

# OpenAI CLIP's normalization, as Qwen2-VL's processor uses.
IMAGE_MEAN = [0.48145466, 0.4578275, 0.40821073]
IMAGE_STD = [0.26862954, 0.26130258, 0.27577711]


def text_shape(size: str) -> dict:
    """The language model's shape (head_dim must be hidden / heads: transformers' Qwen2-VL
    attention has no separate head_dim)."""
    if size == "small":
        return dict(
            hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
            num_key_value_heads=8, head_dim=64, intermediate_size=3072, vocab_size=151936,
            max_position_embeddings=32768, rope_theta=1e6, tie_word_embeddings=True,
        )  # fmt: skip
    return dict(
        hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=32, intermediate_size=384, vocab_size=4032, max_position_embeddings=4096,
        rope_theta=10000.0, tie_word_embeddings=False,
    )  # fmt: skip


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2-VL's split of the rotary frequencies, [16, 24, 24] of 64, scaled to head_dim / 2."""
    half = head_dim // 2
    t = half // 4
    return [t, (half - t) // 2, half - t - (half - t) // 2]


def vision_config(size: str, text_hidden: int) -> dict:
    if size == "small":
        depth, embed_dim, heads = 32, 1280, 16
    else:
        depth, embed_dim, heads = 2, 64, 4
    return {
        "model_type": "qwen2_vl_vision",
        "depth": depth,
        "embed_dim": embed_dim,
        "hidden_size": text_hidden,
        "hidden_act": "quick_gelu",
        "mlp_ratio": 4,
        "num_heads": heads,
        "in_channels": 3,
        "in_chans": 3,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "initializer_range": 0.02,
    }


def config_extras(size: str, text_hidden: int, vision_ids: dict[str, int]) -> dict:
    return {
        "vision_config": vision_config(size, text_hidden),
        "image_token_id": vision_ids[IMAGE_PAD],
        "video_token_id": vision_ids[VIDEO_PAD],
        "vision_start_token_id": vision_ids[VISION_START],
        "vision_end_token_id": vision_ids[VISION_END],
    }


def vision_tensor_specs(vision: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) of the vision tower's tensors, in draw order."""
    e, p, c, t = vision["embed_dim"], vision["patch_size"], 3, vision["temporal_patch_size"]
    mlp = e * vision["mlp_ratio"]
    merged = e * vision["spatial_merge_size"] ** 2
    v = "model.visual."
    specs = [(v + "patch_embed.proj.weight", (e, c, t, p, p), "linear")]
    for i in range(vision["depth"]):
        b = f"{v}blocks.{i}."
        specs += [
            (b + "norm1.weight", (e,), "norm"),
            (b + "norm1.bias", (e,), "bias"),
            (b + "attn.qkv.weight", (3 * e, e), "qk"),
            (b + "attn.qkv.bias", (3 * e,), "bias"),
            (b + "attn.proj.weight", (e, e), "residual"),
            (b + "attn.proj.bias", (e,), "bias"),
            (b + "norm2.weight", (e,), "norm"),
            (b + "norm2.bias", (e,), "bias"),
            (b + "mlp.fc1.weight", (mlp, e), "linear"),
            (b + "mlp.fc1.bias", (mlp,), "bias"),
            (b + "mlp.fc2.weight", (e, mlp), "residual"),
            (b + "mlp.fc2.bias", (e,), "bias"),
        ]
    specs += [
        (v + "merger.ln_q.weight", (e,), "norm"),
        (v + "merger.ln_q.bias", (e,), "bias"),
        (v + "merger.mlp.0.weight", (merged, merged), "linear"),
        (v + "merger.mlp.0.bias", (merged,), "bias"),
        (v + "merger.mlp.2.weight", (vision["hidden_size"], merged), "linear"),
        (v + "merger.mlp.2.bias", (vision["hidden_size"],), "bias"),
    ]
    return specs


def language_model_name(name: str) -> str:
    """transformers 5's name of a text-model tensor of the Qwen2-VL checkpoint."""
    return (
        "model.language_model." + name.removeprefix("model.") if name.startswith("model.") else name
    )


def add_vision_tokens(tokenizer_json: str) -> str:
    """The trained tokenizer with the vision special tokens appended (ids after the text
    special tokens)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(tokenizer_json)
    tokenizer.add_special_tokens(list(VISION_TOKENS))
    return tokenizer.to_str()


def vision_token_ids(tokenizer_json: str) -> dict[str, int]:
    added = json.loads(tokenizer_json)["added_tokens"]
    return {t["content"]: t["id"] for t in added if t["content"] in VISION_TOKENS}


def chat_template(text_template: str) -> str:
    """The text template with image parts rendered as a vision span."""
    text_part = "{%- if part['type'] == 'text' %}{{- part['text'] }}"
    assert text_part in text_template
    return text_template.replace(text_part, text_part + IMAGE_PART)


def preprocessor_config(size: str) -> dict:
    max_pixels = 28 * 28 * 1280 if size == "small" else 28 * 28 * 64
    return {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": IMAGE_MEAN,
        "image_std": IMAGE_STD,
        "min_pixels": 56 * 56,
        "max_pixels": max_pixels,
        "size": {"shortest_edge": 56 * 56, "longest_edge": max_pixels},
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
    }
