"""Qwen2-VL: the Qwen2 language model with M-RoPE, fed by the vision tower (qwen2_vl_vision.py).

The prompt's image placeholder rows take the vision tower's embeddings instead of the
token embedding (`image_embeds`: which rows, what values). Positions are 3-D (M-RoPE):
each token has a (temporal, row, column) position, and the head dim's rotary frequencies
are split into three sections (`mrope_section`), each rotated by one of the three. Text
tokens have three equal positions, so for them M-RoPE is plain RoPE: 1-D positions [N]
mean exactly that (text-only steps pay nothing extra). How the 3-D positions of a prompt
with images are laid out is `mrope_positions` (xllm.engine.multimodal).

Checkpoint names: transformers 5 writes `model.language_model.*` and `model.visual.*`,
the hub's Qwen2-VL checkpoints `model.*` and `visual.*`; both load.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from xllm.models.attention import AttentionMetadata
from xllm.models.config import ModelConfig
from xllm.models.layers import Linear
from xllm.models.llama import LlamaDecoderLayer, LlamaModel
from xllm.models.loader import load_named_weights
from xllm.models.qwen2_vl_vision import Qwen2VisionTransformer, VisionConfig

DEFAULT_MROPE_SECTION = (16, 24, 24)


class Qwen2VLTextModel(LlamaModel):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__(config, dtype, LlamaDecoderLayer)
        # Hub checkpoints say `rope_scaling: {type: mrope, ...}`, transformers 5 writes the
        # section into a `rope_parameters` of type default.
        scaling = config.rope_scaling or config.raw.get("rope_parameters") or {}
        self.mrope_section = list(scaling.get("mrope_section", DEFAULT_MROPE_SECTION))
        if sum(self.mrope_section) * 2 != config.head_dim:
            raise ValueError(
                f"mrope_section {self.mrope_section} must sum to head_dim / 2 = "
                f"{config.head_dim // 2}"
            )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = self.embed_tokens(input_ids)  # [N, hidden]
        if image_embeds is not None:
            rows, embeds = image_embeds  # [M], [M, hidden]
            x[rows] = embeds.to(x.dtype)
        cos, sin = self.rotary_cos_sin(positions)  # [N, 1, D]
        for layer in self.layers:
            x = layer(x, cos, sin, meta)
        return self.norm(x)

    def rotary_cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [N] (text: all three equal) or [3, N] -> cos, sin [N, 1, D]."""
        if positions.dim() == 1:
            return self.rotary(positions)
        return self._mrope(self.rotary.cos, positions), self._mrope(self.rotary.sin, positions)

    def _mrope(self, table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        half = table.shape[-1] // 2
        per_stream = table[positions][..., :half]  # [3, N, D/2]
        sections = per_stream.split(self.mrope_section, dim=-1)
        picked = torch.cat([s[i % 3] for i, s in enumerate(sections)], dim=-1)  # [N, D/2]
        return torch.cat((picked, picked), dim=-1).unsqueeze(1)  # [N, 1, D]


class Qwen2VLForConditionalGeneration(nn.Module):
    def __init__(self, config: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.config = config
        self.vision_config = VisionConfig(config.raw["vision_config"])
        self.image_token_id: int = config.raw["image_token_id"]
        self.visual = Qwen2VisionTransformer(self.vision_config, dtype)
        self.model = Qwen2VLTextModel(config, dtype)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, dtype=dtype)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        image_embeds: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """input_ids [N], positions [N] or [3, N], image_embeds (rows [M], values
        [M, hidden]) -> final hidden states [N, hidden]."""
        return self.model(input_ids, positions, meta, image_embeds)

    def encode_images(
        self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]
    ) -> torch.Tensor:
        """The vision tower: patches [P, C*T*p*p] -> embeddings [P / merge^2, hidden]."""
        return self.visual(pixel_values, grid_thw)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [R, vocab]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        skip = {"lm_head.weight"} if self.config.tie_word_embeddings else set()
        load_named_weights(self, _our_names(weights), skip=skip)


def _our_names(
    weights: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name.startswith("model.language_model."):
            name = "model." + name.removeprefix("model.language_model.")
        elif name.startswith("model.visual."):
            name = name.removeprefix("model.")
        yield name, tensor


def mrope_positions(
    token_ids: list[int],
    image_token_id: int,
    grids: list[tuple[int, int, int]],
    merge_size: int,
) -> tuple[torch.Tensor, int]:
    """The 3-D positions [3, L] of a prompt whose image placeholders are expanded, and the
    delta that continues them for generated tokens (position = index + delta, all three).

    Text tokens count up by one on all three axes. An image's t*h'*w' tokens (h' = h /
    merge, w' = w / merge) sit at (start + t_i, start + row, start + column); the text after
    it resumes at start + max(h', w') (transformers' `get_rope_index`)."""
    runs: list[torch.Tensor] = []
    next_pos, i = 0, 0
    for t, h, w in grids:
        start = token_ids.index(image_token_id, i)
        runs.append(torch.arange(next_pos, next_pos + start - i).expand(3, -1))
        next_pos += start - i
        lh, lw = h // merge_size, w // merge_size
        grid = torch.stack(
            torch.meshgrid(torch.arange(t), torch.arange(lh), torch.arange(lw), indexing="ij")
        )  # [3, t, lh, lw]
        runs.append(grid.reshape(3, -1) + next_pos)
        next_pos += max(lh, lw)
        i = start + t * lh * lw
    runs.append(torch.arange(next_pos, next_pos + len(token_ids) - i).expand(3, -1))
    positions = torch.cat(runs, dim=1)  # [3, L]
    return positions, int(positions.max()) + 1 - len(token_ids)
