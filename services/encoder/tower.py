"""Only the vision tower of a Qwen2-VL checkpoint: its `visual.*` weights, nothing else."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from xllm.engine.multimodal import ImageInput
from xllm.image_processor import num_image_tokens
from xllm.models.config import ModelConfig, parse_dtype
from xllm.models.layers import Linear
from xllm.models.loader import iter_checkpoint, load_named_weights
from xllm.models.qwen2_vl_vision import Qwen2VisionTransformer, VisionConfig

VISION_PREFIXES = ("model.visual.", "visual.")
"""Where the tower's tensors sit in a checkpoint (transformers v5, and older)."""


class VisionTower:
    def __init__(self, model_dir: str, dtype: str = "auto"):
        config = ModelConfig.from_dir(model_dir)
        if "vision_config" not in config.raw:
            raise ValueError(f"{model_dir} ({config.architecture}) has no vision tower")
        torch_dtype = config.torch_dtype if dtype == "auto" else parse_dtype(dtype)
        self.visual = Qwen2VisionTransformer(VisionConfig(config.raw["vision_config"]), torch_dtype)
        load_named_weights(self.visual, _vision_weights(model_dir))
        for module in self.visual.modules():
            if isinstance(module, Linear):
                module.prepare()
        self.visual.eval()
        self.merge_size = self.visual.spatial_merge_size

    @torch.inference_mode()
    def encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """One tower call on every image's patches; each image's rows [tokens, hidden]."""
        pixels = torch.cat([image.pixel_values for image in images]).to(self.visual.dtype)
        grids = [image.grid_thw for image in images]
        out = self.visual(pixels, grids)
        sizes = [num_image_tokens(grid, self.merge_size) for grid in grids]
        return [part.clone() for part in out.split(sizes)]


def _vision_weights(model_dir: str) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_checkpoint(model_dir):
        for prefix in VISION_PREFIXES:
            if name.startswith(prefix):
                yield name.removeprefix(prefix), tensor
                break
