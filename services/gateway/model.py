"""What the gateway knows about the served model: its name, tokenizer and context length.

Only the model folder's tokenizer files and config.json are read; weights stay with the
instances.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from xllm.image_processor import ImageProcessorConfig
from xllm.tokenizer import Tokenizer


@dataclass
class ModelInfo:
    name: str
    """What clients put in `model` (and what instances announce in their heartbeats)."""
    path: str
    """The model folder."""
    tokenizer: Tokenizer
    max_model_len: int
    """Context length: prompt plus output tokens."""
    vocab_size: int
    """The model's vocabulary (config.json's, which may be padded past the tokenizer's)."""
    image_token_id: int | None = None
    """The placeholder an image's tokens are made of (models that take images)."""
    image_processor: ImageProcessorConfig | None = None
    """How the instances size images, hence how many tokens each becomes; None = text only."""
    created: int = field(default_factory=lambda: int(time.time()))
    _token_texts: dict[int, str] = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, path: str, served_name: str = "", max_model_len: int = 0) -> ModelInfo:
        folder = Path(path)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{folder} has no config.json; give a model folder with --model"
            )
        raw = json.loads(config_file.read_text())
        config = raw.get("text_config", raw)  # multimodal configs nest the LM's
        image_token_id = raw.get("image_token_id")
        tokenizer = Tokenizer(folder)
        context = config.get("max_position_embeddings")
        if max_model_len <= 0 and not context:
            raise ValueError(f"{config_file} has no max_position_embeddings; give --max-model-len")
        return cls(
            name=served_name or folder.name or folder.resolve().name,  # as instances do
            path=str(folder),
            tokenizer=tokenizer,
            max_model_len=max_model_len if max_model_len > 0 else int(context),
            vocab_size=max(int(config.get("vocab_size", 0)), tokenizer.vocab_size),
            image_token_id=image_token_id,
            image_processor=ImageProcessorConfig.from_dir(folder) if image_token_id else None,
        )

    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (for logprobs); cached."""
        text = self._token_texts.get(token_id)
        if text is None:
            text = self._token_texts[token_id] = self.tokenizer.decode(
                [token_id], skip_special_tokens=False
            )
        return text
