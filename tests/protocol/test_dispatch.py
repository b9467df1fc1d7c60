"""TypeDispatcher: routes by type, and logs and drops whatever it cannot handle."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest

from xllm.protocol import (
    AbortCmd,
    ErrorCode,
    ErrorInfo,
    GenerateCmd,
    RequestSpec,
    SamplingParams,
    SubmitReply,
    TypeDispatcher,
    decode,
    encode,
    make_callback,
)

LOGGER = "xllm.protocol.dispatch"
GENERATE = GenerateCmd(
    request_id="r1", request=RequestSpec(prompt_token_ids=[1, 2], sampling=SamplingParams())
)


@dataclass
class FakeMsg:
    """The parts of a nats-py `Msg` the callback uses."""

    data: bytes
    reply: str = ""
    subject: str = "xllm.test"
    responses: list[bytes] = field(default_factory=list)
    fail_respond: bool = False

    async def respond(self, payload: bytes) -> None:
        if self.fail_respond:
            raise ConnectionError("connection closed")
        self.responses.append(payload)


def make_dispatcher(seen: list) -> TypeDispatcher:
    async def on_generate(msg: GenerateCmd) -> SubmitReply:
        seen.append(msg)
        return SubmitReply(request_id=msg.request_id, instance_id="inst-0")

    async def on_abort(msg: AbortCmd) -> None:
        raise RuntimeError("handler bug")

    return TypeDispatcher({GenerateCmd: on_generate, AbortCmd: on_abort}, name="test")


async def test_routes_by_type_and_returns_the_handler_result():
    seen: list = []
    result = await make_dispatcher(seen).dispatch(encode(GENERATE))
    assert seen == [GENERATE]
    assert result == SubmitReply(request_id="r1", instance_id="inst-0")


@pytest.mark.parametrize("data", [b"\xc1garbage", encode(GENERATE)[:5], b""])
async def test_undecodable_messages_are_logged_and_dropped(data, caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await make_dispatcher([]).dispatch(data, "xllm.inst.x.cmd") is None
    assert "undecodable" in caplog.text and "xllm.inst.x.cmd" in caplog.text


async def test_messages_without_a_handler_are_logged_and_dropped(caplog):
    reply = SubmitReply(request_id="r", error=ErrorInfo(ErrorCode.TIMEOUT, "late"))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await make_dispatcher([]).dispatch(encode(reply)) is None
    assert "no handler" in caplog.text and "SubmitReply" in caplog.text


async def test_handler_exceptions_are_logged_with_traceback_and_dropped(caplog):
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert await make_dispatcher([]).dispatch(encode(AbortCmd(request_id="r"))) is None
    (record,) = [r for r in caplog.records if r.name == LOGGER]
    assert record.levelno == logging.ERROR
    assert record.exc_info and "handler bug" in str(record.exc_info[1])


def test_registration_is_checked():
    dispatcher = make_dispatcher([])
    assert dispatcher.handles(GenerateCmd) and not dispatcher.handles(SubmitReply)
    with pytest.raises(ValueError):
        dispatcher.register(GenerateCmd, lambda m: None)
    with pytest.raises(TypeError):
        dispatcher.register(SamplingParams, lambda m: None)  # nested type, not a message


async def test_callback_replies_to_requests():
    msg = FakeMsg(encode(GENERATE), reply="_INBOX.1")
    await make_callback(make_dispatcher([]))(msg)
    assert [decode(r) for r in msg.responses] == [
        SubmitReply(request_id="r1", instance_id="inst-0")
    ]


async def test_callback_does_not_reply_to_publishes_or_dropped_messages():
    callback = make_callback(make_dispatcher([]))
    published = FakeMsg(encode(GENERATE))
    await callback(published)
    failed = FakeMsg(encode(AbortCmd(request_id="r")), reply="_INBOX.2")
    await callback(failed)
    garbage = FakeMsg(b"\x00\x01", reply="_INBOX.3")
    await callback(garbage)
    assert published.responses == failed.responses == garbage.responses == []


async def test_callback_survives_bad_replies_and_failed_responds(caplog):
    async def returns_junk(msg):
        return {"not": "a message"}

    junk = TypeDispatcher({GenerateCmd: returns_junk})
    msg = FakeMsg(encode(GENERATE), reply="_INBOX.4")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        await make_callback(junk)(msg)
        assert msg.responses == [] and "cannot encode the reply" in caplog.text
        closed = FakeMsg(encode(GENERATE), reply="_INBOX.5", fail_respond=True)
        await make_callback(make_dispatcher([]))(closed)
    assert "could not reply" in caplog.text
