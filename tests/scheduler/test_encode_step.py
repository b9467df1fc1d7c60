"""The scheduler's encode step on a real nats-server, fed hand-made heartbeats and a
hand-made encoder answering on its subject: refs go into the GenerateCmd (the file stays
beside them), images the encoder cannot read are a 400, and an encoder that does not
answer leaves the request to encode where it runs."""

from __future__ import annotations

import asyncio

import pytest

from services.scheduler.config import SchedulerConfig
from tests.scheduler.beats import heartbeat
from tests.scheduler.test_service import run_scheduler
from xllm.protocol import (
    EmbeddingRef,
    EncodeReply,
    EncodeRequest,
    ErrorCode,
    ErrorInfo,
    GenerateCmd,
    ImageData,
    RequestSpec,
    SamplingParams,
    SubmitReply,
    SubmitRequest,
    decode_as,
    encode,
    subjects,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

REF = EmbeddingRef(
    endpoint="127.0.0.1:1", addr=4096, nbytes=96, shape=[6, 4], dtype="float32",
    grid_thw=[1, 6, 4], content_hash=12345,
)  # fmt: skip


async def place_image_request(nats_url, answer, encoders=("e0",)) -> tuple[SubmitReply, list]:
    """Submit one image request with `answer(EncodeRequest)` (None: no encoder subscribed)
    as the encoder; the reply and the GenerateCmds the instance got."""
    nc, close = await run_scheduler(
        nats_url, SchedulerConfig(policy="least-load", encode_timeout=1.0)
    )
    cmds, subs = [], []
    try:

        async def on_cmd(msg):
            cmds.append(decode_as(msg.data, GenerateCmd))

        async def on_encode(msg):
            await msg.respond(encode(answer(decode_as(msg.data, EncodeRequest))))

        subs.append(await nc.subscribe(subjects.instance_cmd("i0"), cb=on_cmd))
        if answer is not None:
            subs.append(await nc.subscribe(subjects.encoder_cmd("e0"), cb=on_encode))
        await nc.publish(subjects.HEARTBEAT, encode(heartbeat("i0")))
        for encoder in encoders:
            await nc.publish(subjects.HEARTBEAT, encode(heartbeat(encoder, "encode")))
        await asyncio.sleep(0.3)
        image = ImageData(data=b"png bytes", num_tokens=6)
        spec = RequestSpec(prompt_token_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=2),
                           images=[image])  # fmt: skip
        req = SubmitRequest(request_id="r1", request=spec, arrival_time=0.0)
        msg = await nc.request(subjects.SCHED_SUBMIT, encode(req), timeout=5)
        await asyncio.sleep(0.2)
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await close()
    return decode_as(msg.data, SubmitReply), cmds


async def test_the_encoders_refs_go_to_the_instance_beside_the_file(nats_url):
    asked = []

    def answer(req: EncodeRequest) -> EncodeReply:
        asked.append(req)
        return EncodeReply(request_id=req.request_id, embeddings=[REF])

    reply, cmds = await place_image_request(nats_url, answer)
    assert reply.instance_id == "i0" and [r.images[0].data for r in asked] == [b"png bytes"]
    (image,) = cmds[0].request.images
    assert image.embedding == REF and image.data == b"png bytes"  # the fallback, if unreadable


async def test_images_the_encoder_cannot_read_are_refused(nats_url):
    def answer(req: EncodeRequest) -> EncodeReply:
        error = ErrorInfo(code=ErrorCode.INVALID_REQUEST, message="not an image")
        return EncodeReply(request_id=req.request_id, error=error)

    reply, cmds = await place_image_request(nats_url, answer)
    assert reply.error is not None and reply.error.code == ErrorCode.INVALID_REQUEST
    assert cmds == []


async def test_a_silent_encoder_leaves_the_images_to_the_instance(nats_url):
    reply, cmds = await place_image_request(nats_url, None)  # heartbeats, no subscriber
    assert reply.instance_id == "i0"
    assert cmds[0].request.images[0].embedding is None
