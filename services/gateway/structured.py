"""Structured output in request bodies → one `StructuredOutput` (or an `ApiError` naming
the field).

Accepted, at most one of them per request:

    response_format      {"type": "text"} | {"type": "json_object"}
                         | {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}
    structured_outputs   vLLM's {"json": schema} | {"regex": str} | {"choice": [str, ...]}
                         | {"grammar": EBNF}   (exactly one key)
    guided_json / guided_regex / guided_choice / guided_grammar   vLLM's older spellings

Every spec is turned into a grammar here, once (`xllm.engine.grammar.grammar_of`, which
needs no tokenizer), so a bad schema, regex or grammar is a 400 at the edge rather than a
failure on an instance. xgrammar loads with the first request that has one.

NOTE: `json_schema.strict` is accepted and not needed: the output follows the schema
either way (additional properties are allowed only where the schema allows them).
"""

from __future__ import annotations

import json
from typing import Any

from services.gateway.errors import invalid
from xllm.protocol import StructuredKind, StructuredOutput

_VLLM_KEYS = {
    "json": StructuredKind.JSON,
    "regex": StructuredKind.REGEX,
    "choice": StructuredKind.CHOICE,
    "grammar": StructuredKind.GRAMMAR,
}
_GUIDED_FIELDS = {f"guided_{key}": kind for key, kind in _VLLM_KEYS.items()}


def structured_output(body: dict) -> StructuredOutput | None:
    """The body's one output constraint, checked; None when it asks for free text."""
    found = [
        (param, value)
        for param, value in (
            ("response_format", _response_format(body.get("response_format"))),
            ("structured_outputs", _structured_outputs(body.get("structured_outputs"))),
            *((name, _guided(name, body.get(name))) for name in _GUIDED_FIELDS),
        )
        if value is not None
    ]
    if not found:
        return None
    if len(found) > 1:
        names = " and ".join(f"`{param}`" for param, _ in found)
        raise invalid(f"give one output constraint, not {names}", found[1][0])
    param, structured = found[0]
    return checked(structured, param)


def checked(structured: StructuredOutput, param: str) -> StructuredOutput:
    """`structured` if its spec makes a grammar; else a 400 naming `param`."""
    from xllm.engine.grammar import grammar_of  # xgrammar and torch: only when needed

    try:
        grammar_of(structured)
    except ValueError as e:
        message = f"`{param}` is not a valid {structured.kind.value} constraint: {e}"
        raise invalid(message, param) from None
    return structured


def _response_format(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(kind=StructuredKind.JSON_OBJECT)
    if kind != "json_schema":
        raise invalid(
            "`response_format` must be an object with `type` text, json_object or json_schema",
            "response_format",
        )
    spec = value.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
        raise invalid(
            "`response_format.json_schema` must be an object with a string `name` and a `schema`",
            "response_format",
        )
    schema = spec.get("schema", {})
    return _json_schema(schema, "response_format")


def _structured_outputs(value: Any) -> StructuredOutput | None:
    if value is None:
        return None
    given = (
        {k: v for k, v in value.items() if k in _VLLM_KEYS and v is not None}
        if isinstance(value, dict)
        else {}
    )
    if len(given) != 1:
        raise invalid(
            "`structured_outputs` must be an object with exactly one of json, regex, choice "
            "or grammar",
            "structured_outputs",
        )
    ((key, spec),) = given.items()
    return _spec(_VLLM_KEYS[key], spec, "structured_outputs")


def _guided(name: str, value: Any) -> StructuredOutput | None:
    return None if value is None else _spec(_GUIDED_FIELDS[name], value, name)


def _spec(kind: StructuredKind, value: Any, param: str) -> StructuredOutput:
    if kind is StructuredKind.JSON:
        return _json_schema(value, param)
    if kind is StructuredKind.CHOICE:
        if not isinstance(value, list) or not all(isinstance(c, str) for c in value):
            raise invalid(f"`{param}`: a choice must be an array of strings", param)
        return StructuredOutput(kind=kind, spec=json.dumps(value, ensure_ascii=False))
    if not isinstance(value, str):
        raise invalid(f"`{param}`: a {kind.value} must be a string", param)
    return StructuredOutput(kind=kind, spec=value)


def _json_schema(schema: Any, param: str) -> StructuredOutput:
    """A schema given as an object (or, as vLLM allows, as JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise invalid(f"`{param}`: the JSON schema is not JSON: {e}", param) from None
    if not isinstance(schema, dict):
        raise invalid(f"`{param}`: a JSON schema must be an object", param)
    return StructuredOutput(kind=StructuredKind.JSON, spec=json.dumps(schema, ensure_ascii=False))
