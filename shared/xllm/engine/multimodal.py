"""Image inputs of a request: placeholders, M-RoPE positions, embeddings spliced into prefill.

A request with images arrives with one image placeholder token per image (what the chat
template renders) or already expanded (what transformers' processor gives). `MultimodalPrompt`
expands each to the image's token count and keeps, for the sequence's lifetime:

    token_ids      text ... <pad>*n_0 ... <pad>*n_1 ... text      (the expanded prompt)
    spans          (start, n_i) of each image's run of placeholders
    positions      [3, L] M-RoPE positions of the prompt; later tokens are index + delta
    embeddings     per image: given (an encoder made them) or encoded here on first need

The vision tower runs in the step whose prefill chunk first covers an image's tokens
(`ModelRunner` calls `model_inputs`), on the pixels of every image that step needs, in
one call; a chunk splices in just the rows it covers, so chunked prefill cuts through an
image anywhere. Prefix caching tells images apart by content: the block hashes see each
placeholder as the image's content hash (negative, so never a real token id), so equal
text with another image shares no block from the image on.

Text-only requests have `Sequence.mm = None` and never reach this module.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from xllm.image_processor import (
    ImageProcessorConfig,
    image_hash,
    num_image_tokens,
    open_image,
    process_image,
)
from xllm.models.qwen2_vl import mrope_positions
from xllm.protocol.stats import EncoderStats
from xllm.protocol.types import ImageData

if TYPE_CHECKING:
    from xllm.engine.scheduler import ScheduledSeq


@dataclass
class ImageInput:
    """One image of a request, as the engine takes it: pixels to encode, or embeddings."""

    grid_thw: tuple[int, int, int]
    """Patches in time, height and width (what the image processor made)."""
    pixel_values: torch.Tensor | None = None
    """[t*h*w, C*T*p*p] patches for the vision tower."""
    embeddings: torch.Tensor | None = None
    """[tokens, hidden]: already encoded (by an encoder instance); no pixels needed."""
    content_hash: int = 0
    """Identity of the image's content (63 bits), for the prefix cache."""

    @classmethod
    def from_bytes(cls, data: bytes, config: ImageProcessorConfig) -> ImageInput:
        """Decode and preprocess an encoded image (ImageError if it is not one)."""
        processed = process_image(open_image(data), config)
        return cls(
            processed.grid_thw,
            pixel_values=torch.from_numpy(processed.pixel_values),
            content_hash=processed.content_hash,
        )


@dataclass(eq=False)  # identity: one per sequence (and its forks)
class MultimodalPrompt:
    image_token_id: int
    images: list[ImageInput]
    spans: list[tuple[int, int]]
    positions: torch.Tensor
    """[3, num_prompt_tokens] M-RoPE positions."""
    delta: int
    """Tokens past the prompt are at position index + delta (on all three axes)."""
    hash_prompt: list[int] = field(repr=False, default_factory=list)
    """The prompt as the block hashes see it: placeholders replaced by -content hash."""
    embeddings: list[torch.Tensor | None] = field(repr=False, default_factory=list)
    """Per image: [tokens, hidden], given or encoded on first need; kept while the sequence
    lives (a preempted sequence recomputes its prompt without encoding again)."""

    def hash_token_ids(self, token_ids: list[int]) -> list[int]:
        return self.hash_prompt + token_ids[len(self.hash_prompt) :]

    def rope_positions(self, start: int, n: int) -> torch.Tensor:
        """[3, n] positions of tokens [start, start + n)."""
        num_prompt = self.positions.shape[1]
        parts = []
        if start < num_prompt:
            parts.append(self.positions[:, start : min(start + n, num_prompt)])
        past = max(start, num_prompt)
        if past < start + n:
            parts.append(torch.arange(past, start + n).expand(3, -1) + self.delta)
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def decode_images(
    images: Sequence[ImageData], config: ImageProcessorConfig | None
) -> list[ImageInput] | None:
    """A request's images as the engine takes them (None for none); ValueError if the model
    takes no images or one is unreadable."""
    if not images:
        return None
    if config is None:
        raise ValueError("this model does not take images")
    return [ImageInput.from_bytes(image.data, config) for image in images]


def build_prompt(
    prompt_token_ids: list[int], images: list[ImageInput], image_token_id: int, merge_size: int
) -> tuple[list[int], MultimodalPrompt]:
    """The expanded prompt and its multimodal state; ValueError if the placeholders do not
    match the images (one per image, or each image's full count)."""
    counts = [num_image_tokens(image.grid_thw, merge_size) for image in images]
    for image, count in zip(images, counts, strict=True):
        if image.embeddings is not None and image.embeddings.shape[0] != count:
            raise ValueError(
                f"an image of grid {image.grid_thw} has {count} tokens, but its embeddings "
                f"have {image.embeddings.shape[0]} rows"
            )
        if image.embeddings is None and image.pixel_values is None:
            raise ValueError("an image needs pixel values or embeddings")
    num_placeholders = prompt_token_ids.count(image_token_id)
    if num_placeholders == len(images):
        token_ids = expand(prompt_token_ids, image_token_id, counts)
    elif num_placeholders == sum(counts):
        token_ids = list(prompt_token_ids)
    else:
        raise ValueError(
            f"the prompt has {num_placeholders} image placeholders for {len(images)} images "
            f"({sum(counts)} image tokens)"
        )
    grids = [image.grid_thw for image in images]
    positions, delta = mrope_positions(token_ids, image_token_id, grids, merge_size)
    spans, hash_prompt, i = [], list(token_ids), 0
    for image, count in zip(images, counts, strict=True):
        start = token_ids.index(image_token_id, i)
        spans.append((start, count))
        hash_prompt[start : start + count] = [-content_hash(image) - 1] * count
        i = start + count
    embeddings = [image.embeddings for image in images]
    return token_ids, MultimodalPrompt(
        image_token_id, images, spans, positions, delta, hash_prompt, embeddings
    )


def content_hash(image: ImageInput) -> int:
    """The image's given hash, else one of its pixels (or embeddings): never a shared
    default, which would let two images share cached blocks."""
    if image.content_hash:
        return image.content_hash
    tensor = image.pixel_values if image.pixel_values is not None else image.embeddings
    assert tensor is not None
    return image_hash(tensor.detach().float().cpu().numpy())


def expand(prompt_token_ids: list[int], image_token_id: int, counts: list[int]) -> list[int]:
    out: list[int] = []
    remaining = iter(counts)
    for token in prompt_token_ids:
        if token == image_token_id:
            out.extend([token] * next(remaining))
        else:
            out.append(token)
    return out


def model_inputs(
    model: torch.nn.Module,
    items: list[ScheduledSeq],
    positions: torch.Tensor,
    ahead: list[tuple[MultimodalPrompt, int]] = (),  # type: ignore[assignment]
    stats: EncoderStats | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """The step's M-RoPE positions [3, N] (text rows: their 1-D `positions` on all three
    axes) and the image rows with their embeddings, encoding the images first needed now
    and the `ahead` ones (engine/encode_ahead.py) in the same tower call. A step with no
    image prompt (only `ahead`) keeps its 1-D `positions` and no image rows. Tower calls
    are counted in `stats`.

    `items` in flat-batch order (decodes first, as the runner lays them out)."""
    device = positions.device
    _encode_needed(model, items, device, ahead, stats)
    if not any(item.seq.mm is not None for item in items):
        return positions, None
    rope = positions.expand(3, -1).clone()  # [3, N]
    rows: list[torch.Tensor] = []
    embeds: list[torch.Tensor] = []
    row = 0
    for item in items:
        mm, start, n = item.seq.mm, item.seq.num_computed_tokens, item.num_new_tokens
        if mm is not None:
            rope[:, row : row + n] = mm.rope_positions(start, n).to(device)
            for (span_start, count), embedding in zip(mm.spans, mm.embeddings, strict=True):
                lo, hi = max(start, span_start), min(start + n, span_start + count)
                if lo < hi:
                    assert embedding is not None, "encoded by _encode_needed"
                    rows.append(torch.arange(lo - start + row, hi - start + row))
                    embeds.append(embedding[lo - span_start : hi - span_start])
        row += n
    if not rows:
        return rope, None
    return rope, (torch.cat(rows).to(device), torch.cat(embeds))


def _encode_needed(
    model: torch.nn.Module, items: list[ScheduledSeq], device, ahead=(), stats=None
) -> None:
    """Run the vision tower, in one call, on every image this step's chunks reach that has
    no embeddings yet, and on the `ahead` ones."""
    needed: list[tuple[MultimodalPrompt, int]] = []  # (prompt, image index)
    for item in items:
        mm, start, n = item.seq.mm, item.seq.num_computed_tokens, item.num_new_tokens
        if mm is None:
            continue
        for k, (span_start, count) in enumerate(mm.spans):
            overlaps = span_start < start + n and start < span_start + count
            if overlaps and mm.embeddings[k] is None:
                needed.append((mm, k))
    needed += [(mm, k) for mm, k in ahead if mm.embeddings[k] is None]
    if not needed:
        return
    started = time.perf_counter()
    parts = encode_images(model, [mm.images[k] for mm, k in needed], device)
    if stats is not None:
        stats.batches += 1
        stats.images_encoded += len(needed)
        stats.encode_seconds += time.perf_counter() - started
    for (mm, k), part in zip(needed, parts, strict=True):
        mm.embeddings[k] = part


def encode_images(model: torch.nn.Module, images: list[ImageInput], device) -> list[torch.Tensor]:
    """One vision-tower call on every image's pixels: each image's rows [tokens, hidden]
    (views of one tensor)."""
    pixels = torch.cat([image.pixel_values for image in images]).to(device, model.visual.dtype)
    grids = [image.grid_thw for image in images]
    embeddings = model.encode_images(pixels, grids)  # [sum tokens, hidden]
    merge = model.vision_config.spatial_merge_size
    return list(embeddings.split([num_image_tokens(grid, merge) for grid in grids]))


def random_image_bytes(height: int, width: int, seed: int = 0, fmt: str = "PNG") -> bytes:
    """An encoded noise image (tests and benchmarks: synthetic images of given sizes)."""
    import io

    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()
