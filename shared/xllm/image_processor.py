"""Images for Qwen2-VL: decode (Pillow), resize, normalize, cut into the vision tower's patches.

What transformers' `Qwen2VLImageProcessor` does, with Pillow and numpy only (no torch, so
the gateway can count an image's tokens cheaply, and no transformers at serving time):

1. `smart_resize`: both sides rounded to multiples of patch * merge (28) and the area
   kept within [min_pixels, max_pixels] at nearly the same aspect ratio;
2. RGB, bicubic resize (Pillow), scaled to [0, 1], normalized with CLIP's mean and std;
3. patches of 14x14, repeated `temporal_patch_size` times (an image is a one-frame video),
   flattened to rows of C*T*14*14 and ordered merge block by merge block (the 2x2 patches
   the merger fuses into one token are consecutive rows).

An image of grid (t, h, w) patches becomes t*h*w / merge^2 tokens of the language model.
The settings come from the checkpoint's `preprocessor_config.json`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageError(ValueError):
    """The bytes are not an image we can use (the client's fault: HTTP 400)."""


@dataclass(frozen=True)
class ImageProcessorConfig:
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ImageProcessorConfig | None:
        """The checkpoint's settings; None when it has no preprocessor_config.json (text-only)."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            return None
        raw = json.loads(path.read_text())
        size = raw.get("size") or {}
        return cls(
            min_pixels=raw.get("min_pixels") or size.get("shortest_edge") or cls.min_pixels,
            max_pixels=raw.get("max_pixels") or size.get("longest_edge") or cls.max_pixels,
            patch_size=raw.get("patch_size", 14),
            temporal_patch_size=raw.get("temporal_patch_size", 2),
            merge_size=raw.get("merge_size", 2),
            image_mean=tuple(raw.get("image_mean", CLIP_MEAN)),
            image_std=tuple(raw.get("image_std", CLIP_STD)),
        )


@dataclass(frozen=True)
class ProcessedImage:
    pixel_values: np.ndarray
    """[t*h*w, C*T*p*p] float32 patches, in merge-block order."""
    grid_thw: tuple[int, int, int]
    content_hash: int
    """63-bit hash of the decoded pixels: equal images, equal hash (prefix cache, encoder cache)."""


def smart_resize(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int]:
    factor = config.patch_size * config.merge_size
    if max(height, width) / min(height, width) > 200:
        raise ImageError(f"the image's aspect ratio must be under 200, got {height}x{width}")
    h = round(height / factor) * factor
    w = round(width / factor) * factor
    if h * w > config.max_pixels:
        beta = math.sqrt(height * width / config.max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < config.min_pixels:
        beta = math.sqrt(config.min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def grid_thw(height: int, width: int, config: ImageProcessorConfig) -> tuple[int, int, int]:
    h, w = smart_resize(height, width, config)
    return 1, h // config.patch_size, w // config.patch_size


def num_image_tokens(grid: tuple[int, int, int], merge_size: int) -> int:
    t, h, w = grid
    return t * h * w // merge_size**2


def open_image(data: bytes, max_pixels: int | None = None):
    """Decode an encoded image (PNG, JPEG, ...) with Pillow; ImageError if it is not one or
    has more than `max_pixels` pixels (checked before the pixels are decoded)."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if max_pixels is not None and image.width * image.height > max_pixels:
            raise ImageError(
                f"the image is {image.width}x{image.height}; at most {max_pixels} pixels allowed"
            )
        image.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ImageError(f"not a readable image: {e}") from None
    if image.width < 1 or image.height < 1:
        raise ImageError("the image is empty")
    return image


def process_image(image, config: ImageProcessorConfig) -> ProcessedImage:
    """A Pillow image -> the vision tower's input."""
    image = image.convert("RGB")
    resized = resized_pixels(image, config)
    digest = image_hash(resized)
    pixels = resized / 255.0
    pixels = (pixels - np.asarray(config.image_mean, np.float32)) / np.asarray(
        config.image_std, np.float32
    )
    return ProcessedImage(patchify(pixels.transpose(2, 0, 1), config), grid_thw(
        image.height, image.width, config
    ), digest)  # fmt: skip


def resized_pixels(image, config: ImageProcessorConfig) -> np.ndarray:
    """[H, W, 3] float32 RGB at the tower's size (what `image_hash` identifies an image by)."""
    from PIL import Image

    h, w = smart_resize(image.height, image.width, config)
    rgb = image.convert("RGB")
    return np.asarray(rgb.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32)


def content_hash(image, config: ImageProcessorConfig) -> int:
    """The image's identity as the engine, the encoder and the prefix hashes see it."""
    return image_hash(resized_pixels(image, config))


def patchify(image: np.ndarray, config: ImageProcessorConfig) -> np.ndarray:
    """[C, H, W] -> [h*w, C*T*p*p] in merge-block order."""
    c, height, width = image.shape
    p, m, t = config.patch_size, config.merge_size, config.temporal_patch_size
    gh, gw = height // p, width // p
    patches = image.reshape(c, gh // m, m, p, gw // m, m, p)
    patches = patches.transpose(1, 4, 2, 5, 0, 3, 6)  # [gh/m, gw/m, m, m, C, p, p]
    patches = np.broadcast_to(patches[:, :, :, :, :, None], (*patches.shape[:5], t, p, p))
    return np.ascontiguousarray(patches.reshape(gh * gw, c * t * p * p), dtype=np.float32)


def image_hash(pixels: np.ndarray) -> int:
    digest = hashlib.blake2b(digest_size=8)
    digest.update(np.asarray(pixels.shape, np.int64).tobytes())
    digest.update(np.ascontiguousarray(pixels).tobytes())
    return int.from_bytes(digest.digest(), "little") >> 1
