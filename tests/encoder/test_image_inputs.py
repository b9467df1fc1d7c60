"""An instance's image inputs: embeddings read from an encoder through Mooncake, equal to
the tower's own; an image whose embeddings are unreadable (the encoder is gone) is decoded
from its file instead, so the request still runs."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch

from xllm.engine.multimodal import ImageInput, random_image_bytes
from xllm.image_processor import ImageProcessorConfig
from xllm.protocol import ImageData


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2-vl", "float32")


def test_read_embeddings_equal_the_towers_and_a_dead_encoder_falls_back(model_dir):
    from services.encoder.tower import VisionTower
    from xllm.instance.images import ImageInputs
    from xllm.kv_transfer.embeddings import EmbeddingExchange

    processor = ImageProcessorConfig.from_dir(model_dir)
    data = random_image_bytes(60, 90, seed=3)
    image = ImageInput.from_bytes(data, processor)
    (rows,) = VisionTower(str(model_dir)).encode([image])
    encoder = EmbeddingExchange()
    encoder.register(rows)
    ref = encoder.ref(rows, image.grid_thw, image.content_hash)
    inputs = ImageInputs("127.0.0.1")

    (got,) = asyncio.run(
        inputs.inputs([ImageData(data=data, num_tokens=6, embedding=ref)], processor)
    )
    assert torch.equal(got.embeddings, rows) and got.pixel_values is None
    assert got.content_hash == image.content_hash and got.grid_thw == image.grid_thw
    assert inputs.stats.bytes_fetched == rows.nbytes and inputs.stats.images_fetched == 1

    gone = dataclasses.replace(ref, endpoint="127.0.0.1:9")  # nothing listens there
    (fallback,) = asyncio.run(
        inputs.inputs([ImageData(data=data, num_tokens=6, embedding=gone)], processor)
    )
    assert fallback.embeddings is None and torch.equal(fallback.pixel_values, image.pixel_values)
    assert inputs.stats.fetch_failures == 1 and inputs.stats.images_fetched == 1
