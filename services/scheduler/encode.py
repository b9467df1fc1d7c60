"""The encode step of hybrid EPD: before a request with images starts on the instance that
runs its prompt, an encoder instance (role `encode`) turns its images into embeddings.

The scheduler asks one encoder (`EncodeRequest`, request/reply) and puts the refs it
answers into the request's `ImageData.embedding`: the instance then reads the embeddings
through Mooncake and runs no vision tower. The file bytes stay in the request (a file is
small beside its embeddings): an instance that cannot read the embeddings, because the
encoder died since, encodes the file itself and the request still completes. An image goes to the
encoder its content picks (the gateway's content hash, the encoder's cache key; else a hash
of the file), so a repeated image meets its cached embeddings, whatever file it came in.

No encoder, or one that fails or times out: the request keeps its bytes and the instance
encodes them itself (EPD colocated), so the encoder only ever saves work. Images the
encoder cannot read are the request's fault: refused with its 400.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging

from nats.aio.client import Client as NATS

from services.scheduler.cluster import ClusterSnapshot
from xllm.protocol import (
    EncodeReply,
    EncodeRequest,
    ErrorCode,
    ErrorInfo,
    RequestSpec,
    Role,
    decode_as,
    encode,
    subjects,
)

log = logging.getLogger(__name__)

ENCODE_ROLES = (str(Role.ENCODE),)


def pick_encoder(request: RequestSpec, snapshot: ClusterSnapshot) -> str | None:
    """The encoder for this request's images (by their content), or None if none serves it."""
    encoders = snapshot.candidates(request.model, ENCODE_ROLES)
    if not request.images or not encoders:
        return None
    first = request.images[0]
    key = first.content_hash or int.from_bytes(
        hashlib.blake2b(first.data, digest_size=8).digest(), "little"
    )
    return encoders[key % len(encoders)].instance_id


async def encode_remotely(
    nc: NATS, request_id: str, request: RequestSpec, encoder_id: str, timeout: float
) -> RequestSpec | ErrorInfo:
    """`request` with its images' embeddings refs; the request unchanged if
    the encoder did not answer well; an ErrorInfo if it found the images unreadable."""
    ask = EncodeRequest(request_id=request_id, images=list(request.images))
    try:
        msg = await nc.request(subjects.encoder_cmd(encoder_id), encode(ask), timeout=timeout)
        reply = decode_as(msg.data, EncodeReply)
    except Exception as e:  # timeout, no responder, a bad reply: encode in place instead
        log.warning("encoder %s did not encode %s (%r): colocated", encoder_id, request_id, e)
        return request
    if reply.error is not None:
        if reply.error.code == ErrorCode.INVALID_REQUEST:
            return reply.error
        log.warning("encoder %s failed %s: %s", encoder_id, request_id, reply.error.message)
        return request
    if len(reply.embeddings) != len(request.images):
        log.warning("encoder %s answered %d refs for %d images", encoder_id,
                    len(reply.embeddings), len(request.images))  # fmt: skip
        return request
    images = [
        dataclasses.replace(image, embedding=ref)
        for image, ref in zip(request.images, reply.embeddings, strict=True)
    ]
    return dataclasses.replace(request, images=images)
