"""Image-chat workloads for EPD: COCO val2017's image sizes (`../shared/data/`), one image per
request, the same list for the simulator and the live benchmark.

Each request: one image of a listed COCO image's size x `scale` (a `repeat` share reuse an
earlier request's image, what an encoder's cache saves), a short captioning prompt, a fixed
number of output tokens, Poisson arrivals at `rate`. The image's language-model tokens come
from the model's own image processor settings (`grid_thw`: resized within its pixel limits).
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from xllm.image_processor import ImageProcessorConfig, grid_thw, num_image_tokens

COCO = Path(__file__).resolve().parents[4] / "shared" / "data" / "coco_captions_val2017.json.gz"
PROMPT_TOKENS = 12
"""Tokens of the chat around the image: template, vision start/end, "Describe the image."
(the live prompt's count with the tiny Qwen2-VL tokenizer, near enough for any)."""


@dataclass(frozen=True, slots=True)
class ImageRequest:
    arrival: float
    """Seconds after the first request."""
    height: int
    width: int
    image_id: int
    """Equal ids, equal images (pixels and all)."""
    image_tokens: int
    output_len: int

    @property
    def num_prompt_tokens(self) -> int:
        return self.image_tokens + PROMPT_TOKENS


@cache
def coco_sizes(path: Path = COCO) -> tuple[tuple[int, int], ...]:
    """(height, width) of every COCO val2017 image, in the file's order."""
    with gzip.open(path) as f:
        return tuple((i["height"], i["width"]) for i in json.load(f)["images"])


def coco_workload(
    n: int,
    rate: float,
    processor: ImageProcessorConfig,
    scale: float = 0.25,
    repeat: float = 0.25,
    output_len: int = 16,
    seed: int = 0,
) -> list[ImageRequest]:
    """`n` requests at `rate` per second (Poisson; 0 = all at once)."""
    rng = random.Random(seed)
    sizes = coco_sizes()
    merge = processor.merge_size
    out: list[ImageRequest] = []
    t = 0.0
    for k in range(n):
        if out and rng.random() < repeat:
            first = rng.choice(out)
            h, w, image_id = first.height, first.width, first.image_id
        else:
            hh, ww = rng.choice(sizes)
            h, w, image_id = max(28, int(hh * scale)), max(28, int(ww * scale)), k
        tokens = num_image_tokens(grid_thw(h, w, processor), merge)
        out.append(ImageRequest(t, h, w, image_id, tokens, output_len))
        if rate > 0:
            t += rng.expovariate(rate)
    return out


def median_image_tokens(workload: list[ImageRequest]) -> int:
    tokens = sorted(r.image_tokens for r in workload)
    return tokens[len(tokens) // 2]
