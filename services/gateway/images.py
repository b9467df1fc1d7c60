"""Image parts of chat messages -> checked `ImageData`, or a 400 naming the part.

    {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}

Where an image may come from:
  data: URLs (base64)      always;
  file:// URLs and paths   only inside --image-local-dir (off by default);
  http(s) URLs             only from the hosts in --image-url-hosts (off by default), fetched
                           within --image-fetch-timeout and --max-image-bytes, no redirects.

Every image is decoded here with Pillow, so what reaches an instance is an image of at most
--max-image-pixels; how many tokens it becomes follows from its size alone (the model's
image processor settings). At most --max-images-per-request per request, and their bytes
together at most --max-request-image-bytes (they travel inside the request's NATS messages).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp

from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError, invalid
from services.gateway.model import ModelInfo
from xllm.image_processor import (
    ImageError,
    content_hash,
    grid_thw,
    num_image_tokens,
    open_image,
)
from xllm.protocol import ImageData


def image_parts(body: dict) -> list[tuple[str, Any]]:
    """(param, part) of every image part of `messages`, in the order the chat template
    renders them."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return []
    parts = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    parts.append((f"messages[{i}].content[{j}]", part))
    return parts


async def load_images(body: dict, model: ModelInfo, config: GatewayConfig) -> list[ImageData]:
    """The request's images, read and checked; ApiError (400) for any that is not usable."""
    parts = image_parts(body)
    if not parts:
        return []
    if model.image_processor is None:
        raise invalid(f"the model `{model.name}` does not take images", parts[0][0])
    if len(parts) > config.max_images_per_request:
        raise invalid(
            f"{len(parts)} images in one request; at most {config.max_images_per_request} "
            "are allowed (--max-images-per-request)",
            "messages",
        )
    images, total = [], 0
    for param, part in parts:
        data = await _read(part, param, config)
        total += len(data)
        if total > config.max_request_image_bytes:
            raise invalid(
                f"the request's images add up to more than {config.max_request_image_bytes} "
                "bytes (--max-request-image-bytes)",
                param,
            )
        images.append(await asyncio.to_thread(_checked, data, model, config, param))
    return images


def _checked(data: bytes, model: ModelInfo, config: GatewayConfig, param: str) -> ImageData:
    """Decode (the image must be whole), count its tokens and hash its content (as the
    engine will: the scheduler's prefix hashes then match the engine's block hashes)."""
    processor = model.image_processor
    assert processor is not None
    try:
        image = open_image(data, config.max_image_pixels)
        grid = grid_thw(image.height, image.width, processor)
        digest = content_hash(image, processor)
    except ImageError as e:
        raise invalid(f"{param}: {e}", param) from None
    return ImageData(
        data=data, num_tokens=num_image_tokens(grid, processor.merge_size), content_hash=digest
    )


async def _read(part: dict, param: str, config: GatewayConfig) -> bytes:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str) or not url:
        raise invalid(f"{param}: an image_url part needs `image_url.url`", param)
    scheme = urlparse(url).scheme.lower()
    if scheme == "data":
        data = _data_url(url, param, config)
    elif scheme in ("http", "https"):
        data = await _fetch(url, param, config)
    elif scheme in ("file", ""):
        data = _local_file(url, param, config)
    else:
        raise invalid(f"{param}: image URLs with scheme `{scheme}` are not supported", param)
    if len(data) > config.max_image_bytes:
        raise _too_large(param, config)
    return data


def _data_url(url: str, param: str, config: GatewayConfig) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise invalid(f"{param}: a data URL must be `data:image/...;base64,<data>`", param)
    if len(payload) > config.max_image_bytes * 4 // 3 + 4:  # before decoding it
        raise _too_large(param, config)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise invalid(f"{param}: the data URL is not valid base64", param) from None


def _local_file(url: str, param: str, config: GatewayConfig) -> bytes:
    if not config.image_local_dir:
        raise invalid(f"{param}: local image files are not allowed (--image-local-dir)", param)
    path = Path(unquote(urlparse(url).path) if url.startswith("file:") else url).resolve()
    root = Path(config.image_local_dir).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        raise invalid(f"{param}: no image file {path} under --image-local-dir", param)
    if path.stat().st_size > config.max_image_bytes:
        raise _too_large(param, config)
    return path.read_bytes()


async def _fetch(url: str, param: str, config: GatewayConfig) -> bytes:
    hosts = {h.strip().lower() for h in config.image_url_hosts.split(",") if h.strip()}
    host = (urlparse(url).hostname or "").lower()
    if host not in hosts:
        raise invalid(
            f"{param}: image URLs from `{host}` are not allowed (--image-url-hosts)", param
        )
    timeout = aiohttp.ClientTimeout(total=config.image_fetch_timeout)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise invalid(f"{param}: fetching the image gave HTTP {response.status}", param)
            data = await response.content.read(config.max_image_bytes + 1)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise invalid(
            f"{param}: cannot fetch the image: {str(e) or type(e).__name__}", param
        ) from None
    if len(data) > config.max_image_bytes:
        raise _too_large(param, config)
    return data


def _too_large(param: str, config: GatewayConfig) -> ApiError:
    return invalid(
        f"{param}: the image is larger than {config.max_image_bytes} bytes (--max-image-bytes)",
        param,
    )
