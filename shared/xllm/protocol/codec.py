"""The one codec: message dataclass <-> msgpack bytes, with a type tag and schema version.

Wire format — a msgpack map, the envelope:

    {"t": <type tag, str>, "v": <schema version, int>, "d": {<field name>: <value>, ...}}

Field values are msgpack natives: ints (up to 64 bits), floats, str, bytes (bin), bool, nil, arrays
(lists, tuples and NamedTuples), maps (dicts, and nested dataclasses as maps of their fields).
Enums travel as their value (use `StrEnum` / `IntEnum`).

A class becomes a message with `@message("tag", version=1)` on a dataclass; the decorator
reads the field annotations once and builds a converter per field, so decoding is a
msgpack unpack plus one cheap check per field.

Contract of `decode`: it returns an instance of the registered class or raises `DecodeError`
(a ValueError), never anything else, for: bytes that are not msgpack, an envelope that is not
a map with exactly t/v/d, an unknown tag, a version newer than this process knows, a missing
field that has no default, an unknown field, or a value of the wrong type (ints are accepted
where floats are expected; nothing else is coerced). Receivers log and drop such messages.

Versioning: bump `version` on any change to a message's fields (or to a nested dataclass it
carries). A decoder accepts its own version and older ones back to `oldest`; a field added
in a later version must have a default, which fills it in when an older peer leaves it out.
A field whose meaning changes gets a new name. A change older peers' messages cannot be read
through (fields moved into a nested dataclass) also raises `oldest` to the new version, so
their messages are refused as an unsupported version rather than misread: every peer is
upgraded together. Nested dataclasses (SamplingParams, RequestSpec, ErrorInfo) have no tag
and no version of their own: they are versioned by every message that carries them.

`encode` does not validate (the producer is our own typed code); the tests round-trip every
message through `decode`, which does.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")
Conv = Callable[[Any], Any]
"""Checks one decoded msgpack value against a field's type and returns the Python value."""
Enc = Callable[[Any], Any]
"""Turns one field value into msgpack natives (only needed for nested dataclasses)."""


class DecodeError(ValueError):
    """The bytes are not a message this process understands; log and drop them."""


# tag -> class, class -> (tag, newest version this process speaks), class -> oldest version
# it still reads.
_BY_TAG: dict[str, type] = {}
_TAG_OF: dict[type, tuple[str, int]] = {}
_OLDEST: dict[type, int] = {}
_ENVELOPE_KEYS = frozenset(("t", "v", "d"))


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    """How to carry one dataclass: per field its name, converter, encoder and whether it
    must be present."""

    cls: type
    fields: tuple[tuple[str, Conv, bool], ...]
    names: frozenset[str]
    encoders: tuple[tuple[str, Enc | None], ...]


_SPECS: dict[type, _Spec] = {}


def message(tag: str, version: int = 1, oldest: int = 1) -> Callable[[type[T]], type[T]]:
    """Class decorator: register a dataclass as a wire message under `tag` at `version`,
    reading versions `oldest`..`version` (see Versioning in the module docstring)."""
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"message version must be an int >= 1, got {version!r}")
    if not isinstance(oldest, int) or not 1 <= oldest <= version:
        raise ValueError(f"oldest version must be an int in [1, {version}], got {oldest!r}")

    def register(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"@message({tag!r}) must decorate a dataclass, got {cls!r}")
        if tag in _BY_TAG:
            raise ValueError(f"message tag {tag!r} is taken by {_BY_TAG[tag].__qualname__}")
        _spec(cls)  # fail at import time on a field type the codec cannot carry
        _BY_TAG[tag] = cls
        _TAG_OF[cls] = (tag, version)
        _OLDEST[cls] = oldest
        return cls

    return register


def registry() -> dict[str, tuple[type, int]]:
    """Every registered message: tag -> (class, version)."""
    return {tag: (cls, _TAG_OF[cls][1]) for tag, cls in _BY_TAG.items()}


def encode(msg: Any) -> bytes:
    """The envelope of a registered message as msgpack bytes."""
    cls = type(msg)
    try:
        tag, version = _TAG_OF[cls]
    except KeyError:
        raise TypeError(f"{cls.__qualname__} is not a registered message (@message)") from None
    envelope = {"t": tag, "v": version, "d": _to_map(_SPECS[cls], msg)}
    return msgpack.packb(envelope, use_bin_type=True)


def decode(data: bytes) -> Any:
    """The message in `data`, or DecodeError (see the module docstring for what is checked)."""
    try:
        # Non-str map keys are allowed because some fields are dict[int, ...].
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as e:  # msgpack raises a zoo of types on bad input
        raise DecodeError(f"not a msgpack message: {type(e).__name__}: {e}") from None
    if type(envelope) is not dict or envelope.keys() != _ENVELOPE_KEYS:
        raise DecodeError(f"not a message envelope {{t, v, d}}: {_short(envelope)}")
    tag, version = envelope["t"], envelope["v"]
    cls = _BY_TAG.get(tag) if type(tag) is str else None
    if cls is None:
        raise DecodeError(f"unknown message type {_short(tag)}")
    oldest, newest = _OLDEST[cls], _TAG_OF[cls][1]
    if type(version) is not int or not oldest <= version <= newest:
        raise DecodeError(
            f"{tag}: unsupported version {_short(version)} (known: {oldest}..{newest})"
        )
    try:
        return _from_map(_SPECS[cls], envelope["d"])
    except DecodeError as e:
        raise DecodeError(f"{tag} v{version}: {e}") from None


def decode_as(data: bytes, cls: type[T]) -> T:
    """`decode`, and DecodeError unless the message is a `cls` (for request/reply)."""
    msg = decode(data)
    if type(msg) is not cls:
        raise DecodeError(f"expected {cls.__qualname__}, got {type(msg).__qualname__}")
    return msg


# -- maps <-> dataclasses -----------------------------------------------------------------------


def _to_map(spec: _Spec, obj: Any) -> dict[str, Any]:
    out = {}
    for name, enc in spec.encoders:
        value = getattr(obj, name)
        out[name] = value if enc is None else enc(value)
    return out


def _from_map(spec: _Spec, d: Any) -> Any:
    if type(d) is not dict:
        raise DecodeError(f"expected a map of {spec.cls.__qualname__} fields, got {_kind(d)}")
    kwargs = {}
    for name, conv, required in spec.fields:
        if name in d:
            try:
                kwargs[name] = conv(d[name])
            except DecodeError as e:
                raise DecodeError(f"{name}: {e}") from None
        elif required:
            raise DecodeError(f"missing field {name!r}")
    if len(kwargs) != len(d):
        unknown = sorted(_short(k) for k in d.keys() - spec.names)
        raise DecodeError(f"unknown field(s) {', '.join(unknown)}")
    try:
        return spec.cls(**kwargs)
    except (TypeError, ValueError) as e:  # __post_init__ checks of the message itself
        raise DecodeError(f"invalid {spec.cls.__qualname__}: {e}") from None


def _spec(cls: type) -> _Spec:
    spec = _SPECS.get(cls)
    if spec is None:
        spec = _SPECS[cls] = _compile_spec(cls)
    return spec


def _compile_spec(cls: type) -> _Spec:
    hints = typing.get_type_hints(cls)
    fields, encoders = [], []
    for f in dataclasses.fields(cls):
        if not f.init:
            raise TypeError(f"{cls.__qualname__}.{f.name}: init=False fields cannot be decoded")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        try:
            fields.append((f.name, _converter(hints[f.name]), required))
            encoders.append((f.name, _encoder(hints[f.name])))
        except TypeError as e:
            raise TypeError(f"{cls.__qualname__}.{f.name}: {e}") from None
    names = frozenset(name for name, _, _ in fields)
    return _Spec(cls, tuple(fields), names, tuple(encoders))


# -- converters: one per annotation, built once -------------------------------------------------


def _kind(v: Any) -> str:
    return type(v).__name__


def _short(v: Any) -> str:
    """A bounded repr: bad input may be large, and it ends up in logs."""
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(v: Any) -> int:
    if type(v) is int:  # not bool: True is not a token id
        return v
    raise DecodeError(f"expected int, got {_kind(v)}")


def _float(v: Any) -> float:
    if type(v) is float:
        return v
    if type(v) is int:  # msgpack writes 1.0 as a float, but other encoders may not
        return float(v)
    raise DecodeError(f"expected float, got {_kind(v)}")


def _str(v: Any) -> str:
    if type(v) is str:
        return v
    raise DecodeError(f"expected str, got {_kind(v)}")


def _bool(v: Any) -> bool:
    if type(v) is bool:
        return v
    raise DecodeError(f"expected bool, got {_kind(v)}")


def _bytes(v: Any) -> bytes:
    if type(v) is bytes:
        return v
    raise DecodeError(f"expected bin, got {_kind(v)}")


def _none(v: Any) -> None:
    if v is None:
        return None
    raise DecodeError(f"expected nil, got {_kind(v)}")


_SCALARS: dict[Any, Conv] = {
    int: _int,
    float: _float,
    str: _str,
    bool: _bool,
    bytes: _bytes,
    type(None): _none,
}


def _converter(tp: Any) -> Conv:
    if tp in _SCALARS:
        return _SCALARS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _optional(tp, args)
    if origin is typing.Literal:
        return _literal(args)
    if origin is list:
        return _list(_converter(args[0]))
    if origin is dict:
        return _dict(_converter(args[0]), _converter(args[1]))
    if origin is tuple and args and args[-1] is not Ellipsis:
        return _array([_converter(a) for a in args], tuple)
    if isinstance(tp, type):
        if issubclass(tp, enum.Enum):
            return _enum(tp)
        if issubclass(tp, tuple) and hasattr(tp, "_fields"):  # NamedTuple
            hints = typing.get_type_hints(tp)
            return _array([_converter(hints[name]) for name in tp._fields], tp._make)
        if dataclasses.is_dataclass(tp):
            _spec(tp)
            return lambda v: _from_map(_SPECS[tp], v)
    raise TypeError(f"the codec cannot carry {tp!r}")


def _optional(tp: Any, args: tuple) -> Conv:
    others = [a for a in args if a is not type(None)]
    if len(args) != 2 or len(others) != 1:
        raise TypeError(f"only `X | None` unions are supported, not {tp!r}")
    inner = _converter(others[0])
    return lambda v: None if v is None else inner(v)


def _literal(values: tuple) -> Conv:
    allowed = frozenset(values)
    value_types = frozenset(type(a) for a in values)
    expected = " | ".join(repr(a) for a in values)

    def conv(v: Any) -> Any:
        if type(v) in value_types and v in allowed:
            return v
        raise DecodeError(f"expected {expected}, got {_short(v)}")

    return conv


def _list(item: Conv) -> Conv:
    if item is _int:  # token ids and block hashes: the hot case, checked in place

        def int_list(v: Any) -> list[int]:
            if type(v) is not list:
                raise DecodeError(f"expected array, got {_kind(v)}")
            for x in v:
                if type(x) is not int:
                    raise DecodeError(f"expected array of int, found {_kind(x)}")
            return v

        return int_list

    def any_list(v: Any) -> list:
        if type(v) is not list:
            raise DecodeError(f"expected array, got {_kind(v)}")
        return [item(x) for x in v]

    return any_list


def _dict(key: Conv, value: Conv) -> Conv:
    def conv(v: Any) -> dict:
        if type(v) is not dict:
            raise DecodeError(f"expected map, got {_kind(v)}")
        return {key(k): value(x) for k, x in v.items()}

    return conv


def _array(items: list[Conv], make: Callable[[Any], Any]) -> Conv:
    """A fixed-length tuple (or NamedTuple, via `make`) sent as an array."""
    n = len(items)

    def conv(v: Any) -> Any:
        if type(v) is not list or len(v) != n:
            raise DecodeError(f"expected array of {n}, got {_short(v)}")
        return make(c(x) for c, x in zip(items, v, strict=True))

    return conv


def _enum(cls: type[enum.Enum]) -> Conv:
    if not issubclass(cls, (str, int)):
        raise TypeError(f"enum {cls.__qualname__} must be a StrEnum or IntEnum to travel as is")
    value_types = frozenset(type(m.value) for m in cls)

    def conv(v: Any) -> enum.Enum:
        if type(v) in value_types:
            try:
                return cls(v)
            except ValueError:
                pass
        raise DecodeError(f"expected a {cls.__qualname__} value, got {_short(v)}")

    return conv


# -- encoders: only nested dataclasses need work; everything else msgpack packs as is ----------


def _encoder(tp: Any) -> Enc | None:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return lambda v: _to_map(_SPECS[tp], v)
    if origin in (typing.Union, types.UnionType):
        inner = next((e for a in args if (e := _encoder(a)) is not None), None)
        return None if inner is None else (lambda v: None if v is None else inner(v))
    if origin is list:
        item = _encoder(args[0])
        return None if item is None else (lambda v: [item(x) for x in v])
    if origin is dict:
        value = _encoder(args[1])
        return None if value is None else (lambda v: {k: value(x) for k, x in v.items()})
    if origin is tuple or (isinstance(tp, type) and issubclass(tp, tuple)):
        if origin is tuple:
            item_types = list(args)
        else:
            item_types = list(typing.get_type_hints(tp).values())
        if any(_encoder(a) is not None for a in item_types):
            raise TypeError(f"dataclasses inside tuples are not supported: {tp!r}")
    return None
