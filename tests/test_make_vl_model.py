"""`xllm make-model --arch qwen2-vl`: a folder transformers loads as Qwen2-VL, with our weights,
a tokenizer with the vision tokens, a chat template for image parts and an image processor."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file

from xllm.cli.commands import make_model as mm
from xllm.cli.commands import make_vl_model as vl
from xllm.image_processor import ImageProcessorConfig
from xllm.models.config import ModelConfig


def test_loads_in_transformers_with_our_weights(tiny_model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    folder = tiny_model_dir("qwen2-vl")
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    ours = load_file(folder / "model.safetensors")
    theirs = model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    text = model.config.text_config
    assert text.rope_parameters["mrope_section"] == vl.mrope_section(32)
    assert model.config.vision_config.depth == 2 and model.config.vision_config.hidden_size == 128


def test_tokenizer_chat_template_and_image_processor(tiny_model_dir):
    from transformers import AutoImageProcessor, AutoTokenizer

    folder = tiny_model_dir("qwen2-vl")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in vl.VISION_TOKENS}
    config = ModelConfig.from_dir(folder)
    assert ids[vl.IMAGE_PAD] == config.raw["image_token_id"] < config.vocab_size
    assert sorted(ids.values()) == list(range(mm.TOKENIZER_VOCAB, mm.TOKENIZER_VOCAB + 4))
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}, {"type": "text", "text": "Hi"},
    ]}]  # fmt: skip
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == f"<|im_start|>user\n{vl.VISION_START}{vl.IMAGE_PAD}{vl.VISION_END}Hi<|im_end|>\n"
    processor = AutoImageProcessor.from_pretrained(folder)
    assert type(processor).__name__.startswith("Qwen2VLImageProcessor")
    ours = ImageProcessorConfig.from_dir(folder)
    assert (ours.min_pixels, ours.max_pixels) == (56 * 56, 28 * 28 * 64)


def test_the_folder_reads_back_as_the_config_it_was_written_from(tiny_model_dir):
    folder = tiny_model_dir("qwen2-vl")
    assert ModelConfig.from_dir(folder) == mm.model_config("qwen2-vl", "tiny", "float32")


def test_small_shapes():
    c = mm.model_config("qwen2-vl", "small")
    assert c.num_attention_heads * c.head_dim == c.hidden_size
    vision = vl.vision_config("small", c.hidden_size)
    assert (vision["depth"], vision["embed_dim"], vision["num_heads"]) == (32, 1280, 16)
    params = sum(math.prod(spec.shape) for spec in mm.tensor_specs("qwen2-vl", c))
    assert 1.1e9 < params < 1.3e9
