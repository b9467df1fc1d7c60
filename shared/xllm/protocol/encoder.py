"""Encode: the scheduler asks an encoder instance for a request's image embeddings.

`EncodeRequest` (`encoder_cmd(instance_id)`, request/reply) carries the encoded images; the
encoder answers `EncodeReply` with one `EmbeddingRef` per image: where the embeddings wait
in its registered memory. Only that descriptor travels over NATS; the instance that runs
the prompt reads the bytes through the Mooncake Transfer Engine. The scheduler puts each
ref in the request's `ImageData.embedding` (and drops the file bytes) before placing it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm.protocol.codec import message
from xllm.protocol.errors import ErrorInfo
from xllm.protocol.types import EmbeddingRef, ImageData


# v2: `images[].content_hash`, `.offset`.
@message("encode", version=2)
@dataclass(frozen=True, slots=True, kw_only=True)
class EncodeRequest:
    """scheduler → encoder instance: encode these images (the ones of `request_id`)."""

    request_id: str
    """The request they belong to (for logs)."""
    images: list[ImageData]
    """The request's images, in prompt order."""


@message("encode_reply", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class EncodeReply:
    """encoder instance → scheduler: where each image's embeddings can be read, or why not."""

    request_id: str
    """The request's id, as asked."""
    embeddings: list[EmbeddingRef] = field(default_factory=list)
    """One per image of the request, in its order (empty on error)."""
    error: ErrorInfo | None = None
    """Set when the images could not be encoded (e.g. not an image): nothing to read."""
