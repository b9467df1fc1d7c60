"""Qwen2-VL against transformers on the same tiny random checkpoint (float32).

The vision tower's embeddings and the full model's prompt logits agree within 1e-4, for one
image and for two images of different sizes; our image processor gives transformers'
pixels exactly. Greedy generation through our Engine is in test_multimodal_engine.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_engine

from xllm.engine.scheduler import ScheduledSeq
from xllm.engine.sequence import Sequence
from xllm.image_processor import ImageProcessorConfig, process_image
from xllm.models.qwen2_vl import mrope_positions
from xllm.protocol.types import SamplingParams

IMAGE_SIZES = {"one": [(60, 90)], "two": [(60, 90), (120, 50)]}
"""(height, width): 6 and 8 image tokens with the tiny checkpoint's processor."""


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2-vl"))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def hf_image_processor(model_dir):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(model_dir)


def noise_images(sizes, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def expanded_prompt(hf, images_inputs, text_ids: list[int]) -> list[int]:
    """`text_ids` with each image pad token repeated to its image's token count (what
    transformers' Qwen2VLProcessor does; the processor itself needs torchvision)."""
    pad = hf.config.image_token_id
    counts = iter((images_inputs["image_grid_thw"].prod(-1) // 4).tolist())
    return [tok for t in text_ids for tok in ([pad] * next(counts) if t == pad else [t])]


def chat_ids(model_dir, num_images: int) -> list[int]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    content = [{"type": "text", "text": "Look at these:"}]
    content += [{"type": "image"}] * num_images + [{"type": "text", "text": "What is it?"}]
    messages = [{"role": "user", "content": content}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]


@pytest.mark.parametrize("case", IMAGE_SIZES)
def test_image_processor_matches_transformers(model_dir, hf_image_processor, case):
    config = ImageProcessorConfig.from_dir(model_dir)
    for image in noise_images(IMAGE_SIZES[case]):
        theirs = hf_image_processor(images=[image], return_tensors="np")
        ours = process_image(image, config)
        assert ours.grid_thw == tuple(theirs["image_grid_thw"][0])
        np.testing.assert_allclose(ours.pixel_values, theirs["pixel_values"], atol=1e-6)


@pytest.mark.parametrize("case", IMAGE_SIZES)
def test_vision_tower_matches_transformers(model_dir, hf, hf_image_processor, case):
    engine = make_engine(model_dir)
    inputs = hf_image_processor(images=noise_images(IMAGE_SIZES[case]), return_tensors="pt")
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    with torch.no_grad():
        theirs = hf.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        ours = engine.runner.model.encode_images(inputs["pixel_values"], grids)
    assert ours.shape == theirs.pooler_output.shape
    torch.testing.assert_close(ours, theirs.pooler_output, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("case", IMAGE_SIZES)
def test_prompt_logits_match_transformers(model_dir, hf, hf_image_processor, case):
    engine = make_engine(model_dir)
    model = engine.runner.model
    inputs = hf_image_processor(images=noise_images(IMAGE_SIZES[case]), return_tensors="pt")
    prompt = expanded_prompt(hf, inputs, chat_ids(model_dir, len(IMAGE_SIZES[case])))
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    positions, _ = mrope_positions(prompt, model.image_token_id, grids, 2)
    seq = Sequence("probe", prompt, SamplingParams())
    assert engine.block_manager.allocate(seq, len(prompt))
    with torch.inference_mode():
        ids, _, meta = engine.runner._prepare([ScheduledSeq(seq, len(prompt), True)])
        rows = (ids == model.image_token_id).nonzero().squeeze(1)
        embeds = model.encode_images(inputs["pixel_values"], grids)
        ours = model.compute_logits(model(ids, positions, meta, (rows, embeds)))
    engine.block_manager.free(seq)
    input_ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = hf(
            input_ids=input_ids,
            pixel_values=inputs["pixel_values"],
            image_grid_thw=inputs["image_grid_thw"],
            mm_token_type_ids=(input_ids == model.image_token_id).int(),
        ).logits[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # The images matter: the same prompt with other pixels scores differently.
    with torch.no_grad():
        imageless = hf(input_ids=input_ids).logits[0]
    assert not torch.allclose(ours, imageless, atol=1e-2)


def test_a_checkpoint_saved_by_transformers_5_loads_the_same(model_dir, hf, tmp_path):
    """transformers 5 nests the language model's config (`text_config`, M-RoPE in its
    `rope_parameters`) and names tensors `model.language_model.*`: the same model loads."""
    import shutil

    from xllm.models.config import ModelConfig
    from xllm.models.registry import load_model

    hf.save_pretrained(tmp_path)
    assert "text_config" in (tmp_path / "config.json").read_text()
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        shutil.copy(f"{model_dir}/{name}", tmp_path)
    cpu = torch.device("cpu")
    ours = load_model(model_dir, ModelConfig.from_dir(model_dir), torch.float32, cpu)
    saved = load_model(tmp_path, ModelConfig.from_dir(tmp_path), torch.float32, cpu)
    assert saved.model.mrope_section == ours.model.mrope_section == [4, 6, 6]
    theirs = dict(saved.named_parameters())
    assert all(torch.equal(p, theirs[name]) for name, p in ours.named_parameters())
