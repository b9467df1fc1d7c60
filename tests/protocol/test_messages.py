"""Every message type round-trips through the codec, with field values drawn by hypothesis.

The strategies are derived from the dataclass annotations, the same ones the codec reads, so
a new message or field is covered without touching this file.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import types
import typing

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xllm.protocol import (
    DecodeError,
    ErrorCode,
    ErrorInfo,
    KvEvent,
    KvEvents,
    KvMatchReply,
    Logprob,
    RequestSpec,
    Role,
    SamplingParams,
    SetRoleCmd,
    SubmitReply,
    TokenDelta,
    decode,
    encode,
    encoder,
    expert_group,
    gateway,
    instance,
    kv,
    kv_peer,
    registry,
    stream,
    supervisor,
)
from xllm.protocol import errors as errors_module
from xllm.protocol import types as value_types

INT64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)  # msgpack's int range

# Messages with an invariant the generic strategy would break.
OVERRIDES: dict[type, st.SearchStrategy] = {}


def strategy_for(tp: typing.Any) -> st.SearchStrategy:
    """Values of annotation `tp`, covering everything the codec can carry."""
    scalars = {
        int: INT64,
        float: st.floats(allow_nan=False),  # NaN != NaN would fail equality, not the codec
        str: st.text(max_size=12),
        bytes: st.binary(max_size=12),
        bool: st.booleans(),
        type(None): st.none(),
    }
    if tp in scalars:
        return scalars[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return st.one_of([strategy_for(a) for a in args])
    if origin is typing.Literal:
        return st.sampled_from(args)
    if origin is list:
        return st.lists(strategy_for(args[0]), max_size=4)
    if origin is dict:
        return st.dictionaries(strategy_for(args[0]), strategy_for(args[1]), max_size=3)
    if origin is tuple:
        return st.tuples(*map(strategy_for, args))
    if issubclass(tp, enum.Enum):
        return st.sampled_from(tp)
    if issubclass(tp, tuple):  # NamedTuple
        hints = typing.get_type_hints(tp)
        return st.tuples(*(strategy_for(hints[f]) for f in tp._fields)).map(tp._make)
    if tp in OVERRIDES:
        return OVERRIDES[tp]
    hints = typing.get_type_hints(tp)
    fields = {f.name: strategy_for(hints[f.name]) for f in dataclasses.fields(tp)}
    return st.builds(tp, **fields)


OVERRIDES[SubmitReply] = st.one_of(
    st.builds(SubmitReply, request_id=st.text(max_size=8), instance_id=st.text(max_size=8)),
    st.builds(SubmitReply, request_id=st.text(max_size=8), error=strategy_for(ErrorInfo)),
)

MESSAGES = sorted(registry().items())


@pytest.mark.parametrize(("tag", "entry"), MESSAGES, ids=[tag for tag, _ in MESSAGES])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_message_round_trips(tag, entry, data):
    cls, _version = entry
    msg = data.draw(strategy_for(cls))
    back = decode(encode(msg))
    assert type(back) is cls
    assert back == msg


def test_every_protocol_module_is_covered():
    """Each message module registers at least one message, and all are in the registry."""
    modules = {encoder, expert_group, gateway, instance, kv, stream, supervisor}
    registered = {cls.__module__ for cls, _ in registry().values()}
    assert registered == {m.__name__ for m in modules}


def test_nested_tuples_come_back_as_their_named_types():
    delta = TokenDelta(
        request_id="r",
        token_ids=[5],
        logprobs=[Logprob(5, -0.25, {5: -0.25, 9: -3})],
        num_output_tokens=1,
    )
    back = decode(encode(delta))
    assert type(back.logprobs[0]) is Logprob
    assert back.logprobs[0].top == {5: -0.25, 9: -3.0}
    assert type(back.logprobs[0].top[9]) is float  # int on the wire, float in the message

    events = KvEvents(instance_id="i0", events=[KvEvent("stored", 2**63 - 1, "device")], seq=3)
    back = decode(encode(events))
    assert back == events and type(back.events[0]) is KvEvent


def test_enum_fields_come_back_as_enums():
    reply = SubmitReply(request_id="r", error=ErrorInfo(ErrorCode.OVERLOADED, "busy"))
    back = decode(encode(reply))
    assert back.error.code is ErrorCode.OVERLOADED


def test_role_travels_as_its_string():
    beat = decode(encode(SetRoleCmd(role=Role.PREFILL)))
    assert beat.role is Role.PREFILL and beat.role == "prefill"
    assert msgpack.unpackb(encode(SetRoleCmd(role=Role.DECODE)))["d"]["role"] == "decode"


def test_submit_reply_needs_exactly_one_outcome():
    with pytest.raises(ValueError):
        SubmitReply(request_id="r")
    with pytest.raises(ValueError):
        SubmitReply(request_id="r", instance_id="i", error=ErrorInfo(ErrorCode.INTERNAL, "x"))


def test_token_delta_is_small_on_the_wire():
    """The hot message: one per request per step. Keep an eye on its size."""
    delta = TokenDelta(request_id="chatcmpl-0123456789abcdef", token_ids=[31337],
                       num_prompt_tokens=812, num_output_tokens=17)  # fmt: skip
    assert len(encode(delta)) < 200


# -- every field is documented --------------------------------------------------------------------


def _undocumented_fields(module: types.ModuleType) -> list[str]:
    """`Class.field` for each annotated class attribute not followed by a docstring."""
    tree = ast.parse(inspect.getsource(module))
    missing = []
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, stmt in enumerate(body):
            if not isinstance(stmt, ast.AnnAssign):
                continue
            nxt = body[i + 1] if i + 1 < len(body) else None
            documented = (
                isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            )
            if not documented:
                missing.append(f"{cls.name}.{stmt.target.id}")
    return missing


@pytest.mark.parametrize(
    "module",
    [encoder, expert_group, gateway, instance, kv, kv_peer, stream, value_types, errors_module],
)
def test_every_field_has_a_docstring(module):
    assert _undocumented_fields(module) == []


def test_value_types_are_nested_not_registered():
    """Nested dataclasses have no tag: they are versioned by the messages that carry them."""
    registered = {cls for cls, _ in registry().values()}
    assert SamplingParams not in registered and RequestSpec not in registered


def test_kv_events_name_a_known_tier_and_old_match_replies_still_read():
    events = KvEvents(instance_id="i0", events=[KvEvent("stored", 7, "store")], seq=0)
    assert decode(encode(events)) == events
    bad = msgpack.packb(
        {"t": "kv_events", "v": 2, "d": {"instance_id": "i0", "events": [["stored", 7, "tape"]]}}
    )
    with pytest.raises(DecodeError):
        decode(bad)
    v1 = msgpack.packb({"t": "kv_match_reply", "v": 1, "d": {"matched_blocks": {"a": 2}}})
    assert decode(v1) == KvMatchReply(matched_blocks={"a": 2}, matched_tiers={})
    reply = KvMatchReply(matched_blocks={"a": 2}, matched_tiers={"a": {"device": 1, "disk": 1}})
    assert decode(encode(reply)) == reply
