"""The scheduler's prefix hashes see images as the engine's block hashes do: by content.

The gateway's `ImageData` (content hash, offset) turned into `hash_prompt` gives the very
chain the engine's `MultimodalPrompt.hash_prompt` gives, so cache-aware routing meets the
blocks the instances report; two images with the same text around them share the blocks
before the image and none from it on; an image without a hash ends the chain there."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from services.gateway.parsing import placed_images
from services.scheduler.prefix import hash_prompt
from xllm.engine.multimodal import ImageInput, build_prompt, random_image_bytes
from xllm.engine.prefix_hash import block_hashes
from xllm.image_processor import (
    ImageProcessorConfig,
    content_hash,
    grid_thw,
    num_image_tokens,
    open_image,
)
from xllm.protocol import ImageData, RequestSpec, SamplingParams

PAD = 151655
BLOCK = 4
CONFIG = ImageProcessorConfig()
TEXT = list(range(100, 116))  # 4 blocks before the image


def image_request(data: bytes) -> RequestSpec:
    """What the gateway sends for `TEXT <image> tail`, images hashed and placed."""
    image = open_image(data)
    n = num_image_tokens(grid_thw(image.height, image.width, CONFIG), CONFIG.merge_size)
    prompt = [*TEXT, *[PAD] * n, *range(200, 220)]
    checked = ImageData(data=data, num_tokens=n, content_hash=content_hash(image, CONFIG))
    images = placed_images(prompt, SimpleNamespace(image_token_id=PAD), [checked])
    return RequestSpec(prompt_token_ids=prompt, sampling=SamplingParams(), images=images)


def test_the_schedulers_prefix_hashes_are_the_engines_block_hashes():
    a, b = random_image_bytes(60, 90, seed=1), random_image_bytes(60, 90, seed=2)
    chains = []
    for data in (a, b):
        request = image_request(data)
        assert request.images[0].offset == len(TEXT)
        engine_image = ImageInput.from_bytes(data, CONFIG)
        assert request.images[0].content_hash == engine_image.content_hash
        _, mm = build_prompt(request.prompt_token_ids, [engine_image], PAD, CONFIG.merge_size)
        chain = block_hashes(hash_prompt(request), BLOCK)
        assert chain == block_hashes(mm.hash_prompt, BLOCK)
        chains.append(chain)
    first, second = chains
    assert first[:4] == second[:4]  # the text before the image
    assert not set(first[4:]) & set(second[4:])  # nothing from the image on


def test_an_image_without_a_hash_ends_the_prefix_there():
    request = image_request(random_image_bytes(60, 90, seed=1))
    unhashed = dataclasses.replace(request.images[0], content_hash=0)
    assert hash_prompt(dataclasses.replace(request, images=[unhashed])) == TEXT
    unplaced = dataclasses.replace(request.images[0], offset=-1)
    assert hash_prompt(dataclasses.replace(request, images=[unplaced])) == []
    text_only = RequestSpec(prompt_token_ids=TEXT, sampling=SamplingParams())
    assert hash_prompt(text_only) is text_only.prompt_token_ids  # no copy for text


def test_an_image_goes_to_the_encoder_its_content_picks_whatever_its_file():
    from services.scheduler.cluster import ClusterSnapshot, InstanceView
    from services.scheduler.encode import pick_encoder
    from tests.scheduler.beats import heartbeat

    views = [InstanceView(heartbeat(f"e{i}", "encode"), 0.0) for i in range(4)]
    snapshot = ClusterSnapshot(tuple(views))
    picked = set()
    for digest in range(1, 9):  # eight images: more than one encoder gets work
        same = [ImageData(data=data, num_tokens=6, content_hash=digest) for data in (b"a", b"b")]
        spec = [RequestSpec(prompt_token_ids=[1], sampling=SamplingParams(), images=[i],
                            model="m") for i in same]  # fmt: skip
        first, second = (pick_encoder(s, snapshot) for s in spec)
        assert first == second  # two files of one image: one encoder, one cache entry
        picked.add(first)
    assert len(picked) > 1
