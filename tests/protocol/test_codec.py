"""The codec's contract: malformed input of every kind raises DecodeError and nothing else."""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, make_dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.protocol import (
    AbortCmd,
    DecodeError,
    GenerateCmd,
    RequestSpec,
    SamplingParams,
    codec,
    decode,
    decode_as,
    encode,
    message,
)

GOOD = GenerateCmd(
    request_id="r1",
    request=RequestSpec(prompt_token_ids=[1, 2, 3], sampling=SamplingParams(seed=7)),
)
REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(RequestSpec))


def envelope(t="generate", v=2, **fields) -> dict:
    """A hand-built GenerateCmd envelope; fields of `RequestSpec` go into `request`."""
    request = {"prompt_token_ids": [1, 2, 3], "sampling": {}}
    d = {"request_id": "r1", "request": request}
    for name, value in fields.items():
        (request if name in REQUEST_FIELDS else d)[name] = value
    request = {k: x for k, x in request.items() if x is not DROP}
    d = {k: x for k, x in d.items() if x is not DROP}
    if "request" in d:
        d["request"] = request
    return {"t": t, "v": v, "d": d}


DROP = object()


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_the_envelope_is_t_v_d():
    raw = msgpack.unpackb(encode(GOOD))
    assert raw["t"] == "generate" and raw["v"] == 7
    assert raw["d"]["request_id"] == "r1" and raw["d"]["request"]["sampling"]["seed"] == 7


def test_hand_built_envelope_decodes():
    assert decode(pack(envelope())) == GenerateCmd(
        request_id="r1", request=RequestSpec(prompt_token_ids=[1, 2, 3], sampling=SamplingParams())
    )


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"not msgpack at all", encode(GOOD)[:-1], encode(GOOD) + b"\x00"],
    ids=["empty", "reserved-byte", "text", "truncated", "trailing-bytes"],
)
def test_not_msgpack(data):
    with pytest.raises(DecodeError):
        decode(data)


@pytest.mark.parametrize(
    "obj",
    [
        5,
        "generate",
        [1, 2, 3],
        None,
        {"t": "generate", "v": 2},  # no d
        {"t": "generate", "d": {}},  # no v
        {**envelope(), "x": 1},  # extra envelope key
        {"t": "generate", "v": 2, "d": [1, 2]},  # d not a map
    ],
)
def test_not_an_envelope(obj):
    with pytest.raises(DecodeError):
        decode(pack(obj))


@pytest.mark.parametrize("tag", ["no_such_message", "", 5, None, b"generate"])
def test_unknown_tag(tag):
    with pytest.raises(DecodeError, match="unknown message type"):
        decode(pack(envelope(t=tag)))


# 1: GenerateCmd v2 moved its fields into `request`, so it reads v2 and later (`oldest`);
# 8: newer than this process knows.
@pytest.mark.parametrize("version", [1, 8, 99, 0, -1, True, "2", 2.0, None])
def test_unsupported_version(version):
    with pytest.raises(DecodeError, match="unsupported version"):
        decode(pack(envelope(v=version)))


def test_older_version_fills_fields_added_later(monkeypatch):
    """A v3 reader accepts v2 messages: fields added in v3 have defaults."""
    monkeypatch.setitem(codec._TAG_OF, GenerateCmd, ("generate", 3))
    old = decode(pack(envelope(v=2, priority=DROP)))
    assert old.request.priority == 0
    assert decode(pack(envelope(v=3))).request_id == "r1"
    with pytest.raises(DecodeError, match="unsupported version"):
        decode(pack(envelope(v=4)))


def test_missing_required_field():
    with pytest.raises(DecodeError, match="missing field 'request_id'"):
        decode(pack(envelope(request_id=DROP)))


def test_unknown_field():
    with pytest.raises(DecodeError, match="unknown field"):
        decode(pack(envelope(surprise=1)))
    with pytest.raises(DecodeError, match="unknown field"):
        decode(pack(envelope(sampling={"temprature": 0.5})))  # typo in a nested map


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": 5},
        {"request_id": None},
        {"request_id": b"r1"},  # bin is not str
        {"prompt_token_ids": "123"},
        {"prompt_token_ids": [1, "2"]},
        {"prompt_token_ids": [1, 2.0]},
        {"prompt_token_ids": [True]},  # bool is not an int here
        {"prompt_token_ids": None},
        {"priority": 1.5},
        {"sampling": None},
        {"sampling": [1]},
        {"sampling": {"temperature": "hot"}},
        {"sampling": {"seed": 1.0}},
        {"sampling": {"ignore_eos": 1}},
        {"sampling": {"stop_token_ids": [[1]]}},
    ],
)
def test_ill_typed_fields(fields):
    with pytest.raises(DecodeError):
        decode(pack(envelope(**fields)))


def test_error_names_the_message_and_field():
    with pytest.raises(
        DecodeError, match=r"generate v2: request: sampling: temperature: expected float"
    ):
        decode(pack(envelope(sampling={"temperature": "hot"})))


def test_ints_are_accepted_for_floats():
    msg = decode(pack(envelope(sampling={"temperature": 0, "top_p": 1})))
    sampling = msg.request.sampling
    assert sampling.temperature == 0.0 and type(sampling.temperature) is float


@pytest.mark.parametrize(
    ("tag", "fields"),
    [
        ("set_role", {"role": "sideways"}),
        ("set_role", {"role": 1}),
        ("submit_reply", {"request_id": "r", "error": {"code": "nope", "message": "m"}}),
        ("submit_reply", {"request_id": "r"}),  # neither instance nor error: __post_init__
        ("token_delta", {"request_id": "r", "logprobs": [[1, -0.5]]}),  # entry too short
        ("token_delta", {"request_id": "r", "logprobs": [[1, -0.5, {"a": 1.0}]]}),
        ("token_delta", {"request_id": "r", "finish_reason": "done"}),
        ("kv_events", {"instance_id": "i", "events": [["stored", "h", "device"]]}),
        ("kv_match_reply", {"matched_blocks": {"i": "3"}}),
    ],
)
def test_ill_typed_fields_of_other_messages(tag, fields):
    with pytest.raises(DecodeError):
        decode(pack({"t": tag, "v": 1, "d": fields}))


@pytest.mark.parametrize("value", [2**64 - 1, -(2**63), 2**63 - 1])
def test_64_bit_ints(value):
    request = RequestSpec(prompt_token_ids=[value], sampling=SamplingParams())
    msg = GenerateCmd(request_id="r", request=request)
    assert decode(encode(msg)).request.prompt_token_ids == [value]


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_random_bytes_only_ever_raise_decode_error(data):
    with contextlib.suppress(DecodeError):
        decode(data)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(0, len(encode(GOOD)) - 1), byte=st.integers(0, 255))
def test_corrupted_messages_only_ever_raise_decode_error(position, byte):
    data = bytearray(encode(GOOD))
    data[position] = byte
    with contextlib.suppress(DecodeError):
        decode(bytes(data))


def test_decode_as_checks_the_type():
    assert decode_as(encode(GOOD), GenerateCmd) == GOOD
    with pytest.raises(DecodeError, match="expected AbortCmd"):
        decode_as(encode(GOOD), AbortCmd)


def test_encode_refuses_unregistered_types():
    with pytest.raises(TypeError):
        encode(SamplingParams())
    with pytest.raises(TypeError):
        encode({"t": "generate"})


# -- registering messages ---------------------------------------------------------------------------


def test_tags_are_unique():
    with pytest.raises(ValueError, match="taken"):

        @message("generate")
        @dataclass(frozen=True)
        class Impostor:
            x: int


def test_only_dataclasses_can_be_messages():
    with pytest.raises(TypeError):

        @message("test_not_a_dataclass")
        class Plain:
            x: int


@pytest.mark.parametrize("annotation", [set[int], int | str, bytearray, object, tuple[int, ...]])
def test_unsupported_field_types_fail_at_definition(annotation):
    bad = make_dataclass("Bad", [("x", annotation)])
    with pytest.raises(TypeError, match=r"Bad\.x"):
        message("test_unsupported")(bad)
    assert "test_unsupported" not in codec.registry()


def test_bad_version_numbers_are_refused():
    with pytest.raises(ValueError):
        message("test_bad_version", version=0)
    with pytest.raises(ValueError):
        message("test_bad_oldest", version=2, oldest=3)
    with pytest.raises(ValueError):
        message("test_bad_oldest", version=2, oldest=0)


def test_versions_before_oldest_are_refused_by_name():
    with pytest.raises(DecodeError, match=r"generate: unsupported version 1 \(known: 2\.\.7\)"):
        decode(pack(envelope(v=1)))
