"""The gateway's image parts (images.py): where an image may come from, and what gets a 400.

Remote fetches go to a real local HTTP server; everything else is in-process.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from dataclasses import replace

import pytest
from aiohttp import web

from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError
from services.gateway.images import load_images
from services.gateway.model import ModelInfo
from services.gateway.parsing import parse_chat
from xllm.engine.multimodal import ImageInput, random_image_bytes

PNG = random_image_bytes(60, 90)  # 6 tokens with the tiny checkpoint's processor


@pytest.fixture(scope="module")
def vl_model(tiny_model_dir):
    return ModelInfo.load(str(tiny_model_dir("qwen2-vl")), served_name="tiny-vl")


@pytest.fixture
def config(vl_model, tmp_path):
    return GatewayConfig(model=vl_model.path, image_local_dir=str(tmp_path))


def body(*urls: str) -> dict:
    parts = [{"type": "text", "text": "Look:"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return {"model": "tiny-vl", "messages": [{"role": "user", "content": parts}]}


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


async def rejected(b: dict, model, config) -> str:
    with pytest.raises(ApiError) as info:
        await load_images(b, model, config)
    assert info.value.code == "invalid_request" and info.value.param
    return info.value.info.message


async def test_data_and_file_urls_count_their_tokens_into_the_prompt(vl_model, config, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    b = body(data_url(PNG), (tmp_path / "a.png").as_uri())
    images = await load_images(b, vl_model, config)
    assert [i.num_tokens for i in images] == [6, 6] and images[0].data == PNG
    api = parse_chat(b, vl_model, images)
    pad = vl_model.image_token_id
    assert api.gen.prompt_token_ids.count(pad) == 12 and len(api.gen.images) == 2
    text_only = parse_chat(body(), vl_model)
    assert len(api.gen.prompt_token_ids) == len(text_only.gen.prompt_token_ids) + 2 * (2 + 6)
    # Each image placed at its run and hashed as the engine hashes it (the scheduler's
    # prefix hashes see it by content).
    prompt = api.gen.prompt_token_ids
    for image in api.gen.images:
        assert (
            prompt[image.offset - 1] != pad and prompt[image.offset : image.offset + 6] == [pad] * 6
        )
        assert (
            image.content_hash == ImageInput.from_bytes(PNG, vl_model.image_processor).content_hash
        )
    assert api.gen.images[0].offset < api.gen.images[1].offset


async def test_bad_images_are_refused(vl_model, config, tmp_path):
    assert "not a readable image" in await rejected(body(data_url(b"GIF89a?")), vl_model, config)
    assert "base64" in await rejected(body("data:image/png;base64,@@"), vl_model, config)
    small = replace(config, max_image_bytes=1000)
    assert "larger than 1000" in await rejected(body(data_url(PNG)), vl_model, small)
    assert "at most 1" in await rejected(
        body(data_url(PNG), data_url(PNG)), vl_model, replace(config, max_images_per_request=1)
    )
    few_pixels = replace(config, max_image_pixels=100)
    assert "at most 100 pixels" in await rejected(body(data_url(PNG)), vl_model, few_pixels)
    assert "scheme `ftp`" in await rejected(body("ftp://x/y.png"), vl_model, config)


async def test_local_files_only_inside_the_folder(vl_model, config, tmp_path):
    (tmp_path / "a.png").write_bytes(PNG)
    off = replace(config, image_local_dir="")
    assert "--image-local-dir" in await rejected(body(str(tmp_path / "a.png")), vl_model, off)
    outside = tmp_path / ".." / "elsewhere.png"
    assert "no image file" in await rejected(body(outside.as_uri()), vl_model, config)


async def test_a_text_model_takes_no_images(tiny_model_dir):
    model = ModelInfo.load(str(tiny_model_dir("qwen3")), served_name="tiny")
    config = GatewayConfig(model=model.path)
    assert "does not take images" in await rejected(body(data_url(PNG)), model, config)


@contextlib.asynccontextmanager
async def image_server(port: int):
    """A local HTTP server (on the test's own event loop) with an image, a slow answer and
    a redirect."""

    async def image(_request):
        return web.Response(body=PNG, content_type="image/png")

    async def slow(_request):
        await asyncio.sleep(5)
        return web.Response(body=PNG)

    async def moved(_request):
        raise web.HTTPFound("/image.png")

    app = web.Application()
    app.add_routes([web.get("/image.png", image), web.get("/slow", slow), web.get("/moved", moved)])
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


async def test_remote_urls_only_from_allowed_hosts_with_limits(vl_model, config, unused_tcp_port):
    async with image_server(unused_tcp_port) as server:
        await _remote_cases(vl_model, config, server)


async def _remote_cases(vl_model, config, image_server: str) -> None:
    url = f"{image_server}/image.png"
    assert "--image-url-hosts" in await rejected(body(url), vl_model, config)
    allowed = replace(config, image_url_hosts="example.com, 127.0.0.1", image_fetch_timeout=0.5)
    (image,) = await load_images(body(url), vl_model, allowed)
    assert image.data == PNG and image.num_tokens == 6
    assert "HTTP 302" in await rejected(body(f"{image_server}/moved"), vl_model, allowed)
    assert "cannot fetch" in await rejected(body(f"{image_server}/slow"), vl_model, allowed)
    small = replace(allowed, max_image_bytes=1000)
    assert "larger than 1000" in await rejected(body(url), vl_model, small)
