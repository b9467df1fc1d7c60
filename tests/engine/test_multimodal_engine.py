"""Requests with images through our Engine, against transformers' generate (tiny Qwen2-VL,
float32): greedy tokens equal token for token with 1 and 2 images, with the prompt in one
piece or cut into chunks that split images, with pixels or with precomputed embeddings;
the prefix cache shares blocks of the same image and never of a different one."""

from __future__ import annotations

import pytest
import torch
from conftest import greedy, handed_over, make_engine
from test_qwen2_vl_vs_hf import chat_ids, noise_images

from xllm.engine.multimodal import ImageInput, random_image_bytes
from xllm.image_processor import ImageError, ImageProcessorConfig, process_image

pytestmark = pytest.mark.usefixtures("overlap")  # every test: sync and async steps

NEW_TOKENS = 12
IMAGE_SIZES = {"one": [(60, 90)], "two": [(60, 90), (120, 50)]}


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen2-vl"))


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()


def image_inputs(model_dir, sizes, seed=0) -> list[ImageInput]:
    config = ImageProcessorConfig.from_dir(model_dir)
    out = []
    for image in noise_images(sizes, seed):
        processed = process_image(image, config)
        pixels = torch.from_numpy(processed.pixel_values)
        out.append(ImageInput(processed.grid_thw, pixels, content_hash=processed.content_hash))
    return out


def hf_generate(hf, prompt: list[int], images: list[ImageInput]) -> list[int]:
    """transformers' greedy tokens for our (already expanded) prompt and the same pixels."""
    input_ids = torch.tensor([prompt])
    kwargs = {}
    if images:
        kwargs = dict(
            pixel_values=torch.cat([image.pixel_values for image in images]),
            image_grid_thw=torch.tensor([image.grid_thw for image in images]),
            mm_token_type_ids=(input_ids == hf.config.image_token_id).int(),
        )
    with torch.no_grad():
        out = hf.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=NEW_TOKENS,
            do_sample=False, eos_token_id=None, pad_token_id=0, **kwargs,
        )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def run(engine, requests) -> tuple[dict[str, list[int]], dict[str, int]]:
    """requests: {id: (prompt, images)} -> ({id: tokens}, {id: cached prompt tokens})."""
    for request_id, (prompt, images) in requests.items():
        engine.add_request(request_id, prompt, greedy(NEW_TOKENS), images=images)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            tokens.setdefault(delta.request_id, []).extend(delta.token_ids)
            cached[delta.request_id] = delta.num_cached_tokens
    return tokens, cached


def expanded(engine, request_id_prompt, images):
    """Our expanded prompt (the engine's own expansion of one placeholder per image)."""
    engine.add_request("probe", request_id_prompt, greedy(1), images=images)
    prompt = list(engine.sequences["probe"][0].token_ids)
    engine.abort_request("probe")
    return prompt


# A 7-token budget cuts the prompt into chunks that start and end inside images.
@pytest.mark.parametrize(("case", "chunk"), [("one", None), ("two", None), ("two", 7)])
def test_greedy_with_images_matches_transformers(model_dir, hf, case, chunk):
    options = {"max_num_batched_tokens": chunk} if chunk else {}
    engine = make_engine(model_dir, **options)
    images = image_inputs(model_dir, IMAGE_SIZES[case])
    prompt = chat_ids(model_dir, len(images))
    full_prompt = expanded(engine, prompt, images)
    assert len(full_prompt) == len(prompt) + sum(
        t * h * w // 4 - 1 for t, h, w in (i.grid_thw for i in images)
    )
    text_prompt = chat_ids(model_dir, 0)
    others = image_inputs(model_dir, IMAGE_SIZES[case][::-1], seed=1)  # encoded in the same step
    tokens, _ = run(
        engine,
        {"image": (prompt, images), "text": (text_prompt, None), "other": (prompt, others)},
    )
    assert tokens["image"] == hf_generate(hf, full_prompt, images)
    assert tokens["text"] == hf_generate(hf, text_prompt, [])
    assert tokens["other"] == hf_generate(hf, expanded(engine, prompt, others), others)
    assert len(set(tokens["image"])) > 3, "degenerate model output makes this test meaningless"


def test_precomputed_embeddings_give_the_same_tokens(model_dir):
    engine = make_engine(model_dir)
    images = image_inputs(model_dir, IMAGE_SIZES["two"])
    prompt = chat_ids(model_dir, 2)
    with torch.no_grad():
        encoded = [
            ImageInput(i.grid_thw, embeddings=engine.runner.model.encode_images(
                i.pixel_values, [i.grid_thw]), content_hash=i.content_hash)
            for i in images
        ]  # fmt: skip
    tokens, _ = run(engine, {"pixels": (prompt, images), "embeds": (prompt, encoded)})
    assert tokens["pixels"] == tokens["embeds"]


def test_prefix_cache_tells_images_apart(model_dir, hf):
    engine = make_engine(model_dir, block_size=4, enable_prefix_caching=True)
    prompt = chat_ids(model_dir, 1)
    first, other = (
        image_inputs(model_dir, [(60, 90)], seed=0),
        image_inputs(model_dir, [(60, 90)], seed=1),
    )
    tokens_a, _ = run(engine, {"a": (prompt, first)})
    # Same text and image: the prompt's full blocks come from the cache.
    again, cached = run(engine, {"again": (prompt, image_inputs(model_dir, [(60, 90)], seed=0))})
    assert again["again"] == tokens_a["a"] and cached["again"] > 10
    # Same text, another image of the same size: only the blocks before the image hit.
    tokens_b, cached = run(engine, {"b": (prompt, other)})
    image_start = prompt.index(engine.runner.model.image_token_id)
    assert cached["b"] <= image_start
    assert tokens_b["b"] == hf_generate(hf, expanded(engine, prompt, other), other)
    assert tokens_b["b"] != tokens_a["a"]
    # Images given without a content hash are told apart by their pixels.
    unhashed = [ImageInput(i.grid_thw, i.pixel_values) for i in other]
    tokens_c, cached = run(engine, {"c": (prompt, unhashed)})
    assert cached["c"] <= image_start and tokens_c["c"] == tokens_b["b"]


def test_pd_handoff_with_images_gives_the_same_tokens(model_dir):
    """The prefill side encodes and prefills; the decode side decodes with the M-RoPE delta
    of the same images (the decode instance gets the request too)."""
    images = image_inputs(model_dir, IMAGE_SIZES["two"])
    prompt = chat_ids(model_dir, 2)
    colocated, _ = run(make_engine(model_dir), {"r": (prompt, images)})
    _, tokens = handed_over(
        make_engine(model_dir), make_engine(model_dir), prompt, greedy(NEW_TOKENS), images
    )
    assert tokens == colocated["r"]


def test_bad_images_are_rejected_and_change_nothing(model_dir):
    engine = make_engine(model_dir)
    images = image_inputs(model_dir, IMAGE_SIZES["two"])
    with pytest.raises(ValueError, match="placeholders"):
        engine.add_request("x", chat_ids(model_dir, 1), greedy(2), images=images)
    with pytest.raises(ImageError):
        ImageInput.from_bytes(b"not an image", engine.image_processor)
    assert not engine.has_unfinished() and not engine.sequences
    image = ImageInput.from_bytes(random_image_bytes(60, 90), engine.image_processor)
    assert image.grid_thw == (1, 4, 6)
