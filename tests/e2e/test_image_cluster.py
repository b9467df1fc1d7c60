"""Image requests through a real colocated cluster (nats-server, valkey, scheduler, one
Qwen2-VL instance, gateway), driven with the `openai` client.

The same chat with images gives the engine's own greedy tokens, with the image sent as a
data URL or (behind --image-local-dir) as a file:// URL; usage counts the image tokens; bad
images (not an image, too large, too many, a remote URL not on the allow-list, a local file
without the flag's folder) get a 400 with an OpenAI error body, and the cluster keeps serving.
"""

from __future__ import annotations

import os

import openai
import pytest

from tests.e2e import image_chat
from tests.e2e.image_chat import data_url
from xllm.cli.cluster import ClusterConfig, free_port, serving_cluster
from xllm.engine.multimodal import random_image_bytes

pytestmark = pytest.mark.slow

MAX_TOKENS = 10
SIZES = [(60, 90), (120, 50)]
"""6 and 8 image tokens with the tiny checkpoint's processor."""


@pytest.fixture(scope="module")
def model_dir(vl_model_dir):
    return vl_model_dir


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    for i, (h, w) in enumerate(SIZES):
        (folder / f"{i}.png").write_bytes(random_image_bytes(h, w, seed=i))
    return folder


@pytest.fixture(scope="module")
def cluster(model_dir, image_dir, tmp_path_factory):
    config = ClusterConfig(
        model=str(model_dir),
        host="127.0.0.1",
        port=free_port(),
        instances=1,
        log_dir=str(tmp_path_factory.mktemp("logs")),
        ready_timeout=180,
        stop_grace=5,
    )
    gateway_env = {
        "XLLM_IMAGE_LOCAL_DIR": str(image_dir),
        "XLLM_MAX_IMAGES_PER_REQUEST": "2",
        "XLLM_MAX_IMAGE_BYTES": str(64 * 1024),
    }
    saved = {name: os.environ.get(name) for name in gateway_env}
    os.environ.update(gateway_env)  # the services read XLLM_* from the environment
    c = serving_cluster(config, ["--num-kv-blocks", "256", "--dtype", "float32"])
    try:
        c.start()
        c.wait_ready(config.ready_timeout)
        yield c, config
    finally:
        c.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture(scope="module")
def client(cluster):
    return openai.OpenAI(base_url=cluster[1].base_url, api_key="unused", max_retries=0)


def chat(client, parts, **kw):
    return image_chat.chat(client, parts, MAX_TOKENS, **kw)


def test_image_chat_equals_the_engine_alone(client, vl_engine, model_dir, image_dir):
    images = [(image_dir / f"{i}.png").read_bytes() for i in range(2)]
    parts = [
        {"type": "text", "text": "Compare"},
        {"type": "image_url", "image_url": {"url": data_url(images[0])}},
        {"type": "text", "text": "with"},
        {"type": "image_url", "image_url": {"url": (image_dir / "1.png").as_uri()}},
    ]
    expected, num_prompt = image_chat.engine_alone(vl_engine, model_dir, parts, images, MAX_TOKENS)
    response = chat(client, parts)
    from xllm.tokenizer import Tokenizer

    assert response.choices[0].message.content == Tokenizer(model_dir).decode(expected)
    assert response.usage.prompt_tokens == num_prompt  # 6 + 8 image tokens among the text
    assert response.usage.completion_tokens == MAX_TOKENS
    # The other image first: another answer (the images are really used).
    swapped = [parts[0], parts[3], parts[2], parts[1]]
    assert chat(client, swapped).choices[0].message.content != response.choices[0].message.content


BAD = {
    "not an image": [{"type": "image_url", "image_url": {"url": data_url(b"plain text")}}],
    "bad base64": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,%%%"}}],
    "too large": [
        {"type": "image_url", "image_url": {"url": data_url(random_image_bytes(300, 300))}}
    ],
    "too many": [
        {"type": "image_url", "image_url": {"url": data_url(random_image_bytes(30, 30, seed=i))}}
        for i in range(3)
    ],
    "remote url": [{"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}],
    "outside the folder": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}],
}


@pytest.mark.parametrize("case", BAD)
def test_bad_images_get_400_and_the_cluster_keeps_serving(client, case):
    with pytest.raises(openai.BadRequestError) as info:
        chat(client, [{"type": "text", "text": "What is this?"}, *BAD[case]])
    error = info.value.body
    assert error["type"] == "invalid_request_error" and error["message"], error
    ok = chat(client, [{"type": "text", "text": "Still there?"}])
    assert ok.usage.completion_tokens == MAX_TOKENS
