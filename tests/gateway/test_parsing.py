"""Request validation: each bad body becomes the right status and OpenAI error body."""

from __future__ import annotations

import dataclasses
import json

import pytest
from aiohttp import web

from services.gateway import parsing
from services.gateway.errors import ApiError, classify
from services.gateway.parsing import MAX_N, parse_chat, parse_completion
from xllm.protocol import ErrorCode, ProtocolError, SamplingParams, http_status

MSGS = [{"role": "user", "content": "hi"}]


def completion(model_info, **body):
    return parse_completion({"model": "tiny", "prompt": "hello", **body}, model_info)


def chat(model_info, **body):
    return parse_chat({"model": "tiny", "messages": MSGS, **body}, model_info)


def error_of(fn, *args, **kwargs) -> tuple[int, dict]:
    with pytest.raises(ApiError) as e:
        fn(*args, **kwargs)
    err = classify(e.value)
    return err.status, err.body()["error"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"n": True}, "n"),
        ({"n": 0}, "n"),
        ({"n": MAX_N + 1}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop": 5}, "stop"),
        ({"stop_token_ids": [10**7]}, "stop_token_ids"),
        ({"stop_token_ids": ["a"]}, "stop_token_ids"),
        ({"echo": True}, "echo"),
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"1": 5}}, "logit_bias"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"prompt": {"text": "x"}}, "prompt"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ],
)
def test_invalid_completion_bodies_are_400(model_info, body, param):
    status, error = error_of(completion, model_info, **body)
    assert status == 400
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["message"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"content": "no role"}]}, "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0]"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"tools": []}, "tools"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": 3}}]}, "tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "x"},
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format",
        ),
    ],
)
def test_invalid_chat_bodies_are_400(model_info, body, param):
    status, error = error_of(chat, model_info, **body)
    assert (status, error["param"]) == (400, param)


def test_unknown_model_is_404(model_info):
    status, error = error_of(completion, model_info, model="gpt-9")
    assert status == 404 and error["param"] == "model" and error["code"] == "not_found"


def test_context_length(model_info):
    m = model_info.max_model_len
    status, error = error_of(completion, model_info, prompt=[1] * m)
    assert status == 400 and error["code"] == ErrorCode.CONTEXT_LENGTH_EXCEEDED
    assert str(m) in error["message"]
    status, error = error_of(completion, model_info, prompt=[1] * 10, max_tokens=m - 9)
    assert (status, error["param"]) == (400, "max_tokens")
    assert completion(model_info, prompt=[1] * 10, max_tokens=m - 10).gen.sampling.max_tokens


def test_every_scalar_sampling_field_is_read_from_the_body_field_of_its_name(model_info):
    """parsing.py lists no sampling field: a field added to SamplingParams is accepted."""
    body = {"min_tokens": 3, "temperature": 0.5, "top_k": 4, "top_p": 0.5, "min_p": 0.25,
            "seed": 9, "repetition_penalty": 1.5, "presence_penalty": 0.5,
            "frequency_penalty": -0.5, "ignore_eos": True}  # fmt: skip
    beam = {"use_beam_search": True, "beam_width": 3, "length_penalty": 0.5}  # valid together
    scalar = {f.name for f in dataclasses.fields(SamplingParams)} - parsing._READ_APART
    assert scalar == body.keys() | beam.keys()
    s = completion(model_info, prompt=[5], max_tokens=4, **body).gen.sampling
    assert {name: getattr(s, name) for name in body} == body
    s = completion(model_info, prompt=[5], max_tokens=4, **beam).gen.sampling
    assert {name: getattr(s, name) for name in beam} == beam
    assert type(s.temperature) is float and type(s.presence_penalty) is float
    assert type(completion(model_info, prompt=[5], temperature=1).gen.sampling.temperature) is float


def test_defaults_and_extras(model_info):
    api = completion(model_info, prompt=[5, 6, 7])
    s = api.gen.sampling
    assert s.max_tokens == model_info.max_model_len - 3 and s.n == 1 and s.temperature == 1.0
    assert api.gen.prompt_token_ids == [5, 6, 7] and api.gen.request_id.startswith("cmpl-")
    api = completion(
        model_info,
        prompt=["batch of one"],
        ignore_eos=True,
        min_tokens=2,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        stop_token_ids=[3],
        stop=["a", "b"],
        include_stop_str_in_output=True,
        logprobs=3,
        seed=7,
        stream=True,
        stream_options={"include_usage": True},
    )
    s = api.gen.sampling
    assert (s.ignore_eos, s.min_tokens, s.top_k, s.min_p) == (True, 2, 5, 0.1)
    assert (s.repetition_penalty, s.stop_token_ids, s.logprobs, s.seed) == (1.2, [3], 3, 7)
    assert api.gen.stop == ("a", "b") and api.gen.include_stop_str_in_output
    assert api.stream and api.include_usage and api.logprobs == 3
    api = chat(model_info, max_tokens=9, max_completion_tokens=7, logprobs=True, top_logprobs=2)
    assert api.gen.sampling.max_tokens == 7 and api.gen.sampling.logprobs == 2
    assert api.gen.prompt_token_ids == model_info.tokenizer.encode_chat(MSGS)
    parts = [
        {"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}
    ]
    assert chat(model_info, messages=parts).gen.prompt_token_ids == api.gen.prompt_token_ids


def test_every_error_code_maps_through_http_status():
    for code in ErrorCode:
        err = classify(ProtocolError(code, "x"))
        assert err.status == http_status(code) and err.code == code.value
        assert set(err.body()["error"]) == {"message", "type", "param", "code"}
    assert classify(ApiError(ErrorCode.UNAUTHORIZED, "x")).type == "authentication_error"
    assert classify(ApiError(ErrorCode.OVERLOADED, "x")).status == 429


def test_other_exceptions():
    too_big = web.HTTPRequestEntityTooLarge(max_size=10, actual_size=20)
    assert classify(too_big).status == 413
    with pytest.raises(json.JSONDecodeError) as e:
        json.loads("{nope")
    assert classify(e.value).status == 400
    assert classify(web.HTTPNotFound()).status == 404
    assert classify(TimeoutError()).status == 504
    err = classify(RuntimeError("boom"))
    assert err.status == 500 and err.type == "server_error" and "boom" not in err.message


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("body", "kind", "spec"),
    [
        ({"response_format": {"type": "json_object"}}, "json_object", ""),
        ({"response_format": {"type": "text"}}, None, None),
        (
            {"response_format": {"type": "json_schema",
                                 "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}},
            "json", json.dumps(SCHEMA),
        ),
        ({"structured_outputs": {"json": SCHEMA}}, "json", json.dumps(SCHEMA)),
        ({"structured_outputs": {"regex": "[0-9]+"}}, "regex", "[0-9]+"),
        ({"structured_outputs": {"choice": ["a", "é"]}}, "choice", '["a", "é"]'),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, "grammar", 'root ::= "x"'),
        ({"guided_json": json.dumps(SCHEMA)}, "json", json.dumps(SCHEMA)),
        ({"guided_regex": "a|b"}, "regex", "a|b"),
        ({"guided_choice": ["a"]}, "choice", '["a"]'),
        ({"guided_grammar": 'root ::= "x"'}, "grammar", 'root ::= "x"'),
    ],
)  # fmt: skip
@pytest.mark.parametrize("make", [completion, chat])
def test_structured_output_fields_become_one_constraint(model_info, make, body, kind, spec):
    structured = make(model_info, **body).gen.sampling.structured
    if kind is None:
        assert structured is None
    else:
        assert (structured.kind, structured.spec) == (kind, spec)
        assert structured.num_replayed_tokens == 0


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": {"type": "objec"}}}},
         "response_format", "objec"),
        ({"structured_outputs": {"regex": "[a-z"}}, "structured_outputs", "Unclosed"),
        ({"structured_outputs": {"grammar": "root ::= "}}, "structured_outputs", "EBNF"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs", "non-empty"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "one"),
        ({"structured_outputs": "a"}, "structured_outputs", "exactly one"),
        ({"guided_json": "{not json"}, "guided_json", "not JSON"),
        ({"guided_regex": 5}, "guided_regex", "string"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex",
         "one output constraint"),
    ],
)  # fmt: skip
def test_invalid_constraints_are_400_naming_the_field(model_info, body, param, words):
    status, error = error_of(completion, model_info, **body)
    assert (status, error["param"], error["type"]) == (400, param, "invalid_request_error")
    assert words in error["message"]


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}},
    {"type": "function", "function": {"name": "noop"}},
]


def test_tool_choice_sets_the_constraint_and_how_to_read_calls(model_info):
    named = chat(model_info, tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    assert named.tool_calling.function == "get_weather"
    assert json.loads(named.gen.sampling.structured.spec) == SCHEMA
    for choice in ("required", "auto", None):  # auto: treated as required (tools.py)
        api = chat(model_info, tools=TOOLS, **({"tool_choice": choice} if choice else {}))
        assert api.tool_calling.function is None
        schema = json.loads(api.gen.sampling.structured.spec)
        assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
    free = chat(model_info, tools=TOOLS, tool_choice="none")
    assert free.tool_calling is None and free.gen.sampling.structured is None


def test_tool_calls_read_from_the_output(model_info):
    named = chat(model_info, tools=TOOLS,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    (call,) = named.tool_calling.calls('{"a": 1}')
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather", "arguments": '{"a": 1}'}
    array = chat(model_info, tools=TOOLS, tool_choice="required").tool_calling
    calls = array.calls('[{"name": "noop", "parameters": {}}, {"name": "get_weather", '
                        '"parameters": {"a": 2}}]')  # fmt: skip
    assert [c["function"]["name"] for c in calls] == ["noop", "get_weather"]
    assert calls[1]["function"]["arguments"] == '{"a": 2}'
    assert array.calls('[{"name": "noop", "par') is None  # cut short


def test_beam_search_fields(model_info):
    s = completion(
        model_info, prompt=[5], max_tokens=4, n=2, use_beam_search=True, beam_width=4,
        early_stopping="never", allowed_items=[[5, 6], [7]],
    ).gen.sampling  # fmt: skip
    assert (s.num_beams, s.n, s.early_stopping, s.allowed_items) == (4, 2, "never", [[5, 6], [7]])
    s = completion(model_info, prompt=[5], use_beam_search=True, item_trie="items").gen.sampling
    assert s.item_trie == "items" and s.early_stopping is False


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"use_beam_search": True, "beam_width": 1000}, "beam_width"),
        ({"use_beam_search": True, "n": 3, "beam_width": 2}, "n"),
        ({"use_beam_search": True, "early_stopping": "soon"}, "early_stopping"),
        ({"use_beam_search": True, "allowed_items": [5]}, "allowed_items"),
        ({"use_beam_search": True, "allowed_items": [[10**9]]}, "allowed_items"),
        ({"use_beam_search": True, "item_trie": 3}, "item_trie"),
        ({"use_beam_search": True, "response_format": {"type": "json_object"}}, "use_beam_search"),
        ({"beam_width": 4}, "beam_width"),
    ],
)
def test_bad_beam_search_fields_are_a_400_naming_the_field(model_info, fields, param):
    with pytest.raises(ApiError) as raised:
        completion(model_info, prompt=[5], max_tokens=4, **fields)
    assert raised.value.param == param
