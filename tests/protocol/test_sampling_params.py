"""SamplingParams is one type from the gateway to the sampler: it travels as it is."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.protocol import (
    GenerateCmd,
    RequestSpec,
    SamplingParams,
    StructuredKind,
    StructuredOutput,
    decode,
    encode,
)

params_strategy = st.builds(
    SamplingParams,
    n=st.integers(1, 8),
    max_tokens=st.integers(1, 4096),
    min_tokens=st.integers(0, 16),
    temperature=st.floats(0, 2),
    top_k=st.integers(-1, 100),
    top_p=st.floats(0.01, 1),
    min_p=st.floats(0, 1),
    seed=st.none() | st.integers(0, 2**63 - 1),
    repetition_penalty=st.floats(0.5, 2),
    presence_penalty=st.floats(-2, 2),
    frequency_penalty=st.floats(-2, 2),
    ignore_eos=st.booleans(),
    stop_token_ids=st.lists(st.integers(0, 150_000), max_size=4),
    logprobs=st.none() | st.integers(0, 20),
    structured=st.none()
    | st.builds(
        StructuredOutput,
        kind=st.sampled_from(StructuredKind),
        spec=st.text(max_size=40),
        num_replayed_tokens=st.integers(0, 100),
    ),
)


@settings(max_examples=50, deadline=None)
@given(params=params_strategy)
def test_params_round_trip_through_the_wire(params):
    cmd = GenerateCmd(request_id="r", request=RequestSpec(prompt_token_ids=[1], sampling=params))
    back = decode(encode(cmd)).request.sampling
    assert back == params and type(back) is SamplingParams


def test_an_empty_map_is_the_defaults():
    """A sender that leaves every field out means the defaults (the codec fills them in)."""
    d = {"request_id": "r", "request": {"prompt_token_ids": [1], "sampling": {}}}
    data = msgpack.packb({"t": "generate", "v": 2, "d": d})
    assert decode(data).request.sampling == SamplingParams()


def test_params_are_frozen():
    """The engine keeps a reference to the params it was given: nobody may change them."""
    params = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.max_tokens = 3  # type: ignore[misc]


def test_a_grammar_travels_as_a_nested_map_and_forbids_speculation():
    structured = StructuredOutput(kind=StructuredKind.REGEX, spec="[a-z]+", num_replayed_tokens=3)
    params = SamplingParams(structured=structured)
    cmd = GenerateCmd(request_id="r", request=RequestSpec(prompt_token_ids=[1], sampling=params))
    wire = msgpack.unpackb(encode(cmd))["d"]["request"]["sampling"]["structured"]
    assert wire == {"kind": "regex", "spec": "[a-z]+", "num_replayed_tokens": 3}
    assert decode(encode(cmd)).request.sampling == params
    assert not params.allows_speculation and SamplingParams().allows_speculation
    assert structured.key == (StructuredKind.REGEX, "[a-z]+")


def test_a_v2_generate_without_a_grammar_still_decodes():
    d = {"request_id": "r", "request": {"prompt_token_ids": [1], "sampling": {"n": 1}}}
    msg = decode(msgpack.packb({"t": "generate", "v": 2, "d": d}))
    assert msg.request.sampling.structured is None


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
def test_beam_search_fields_travel_and_forbid_speculation(early_stopping):
    params = SamplingParams(
        n=2,
        use_beam_search=True,
        beam_width=4,
        length_penalty=0.5,
        early_stopping=early_stopping,
        allowed_items=[[5, 6], [7]],
    )
    params.validate(vocab_size=10)
    cmd = GenerateCmd(request_id="r", request=RequestSpec(prompt_token_ids=[1], sampling=params))
    assert decode(encode(cmd)).request.sampling == params
    assert params.num_beams == 4 and not params.allows_speculation
    assert SamplingParams(n=3, use_beam_search=True).num_beams == 3


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"beam_width": 257}, "beam_width must be in"),
        ({"beam_width": 2, "n": 3}, r"n \(3\) must not exceed beam_width \(2\)"),
        ({"structured": StructuredOutput(kind=StructuredKind.JSON_OBJECT)}, "structured"),
        ({"repetition_penalty": 1.2}, "penalties"),
        ({"logprobs": 1}, "cumulative logprobs"),
        ({"early_stopping": "sometimes"}, "early_stopping must be"),
        ({"item_trie": "a", "allowed_items": [[1]]}, "not both"),
        ({"allowed_items": [[1], []]}, "non-empty"),
        ({"allowed_items": [[1, 99]]}, r"allowed_items token ids must be in \[0, 10\)"),
    ],
)
def test_bad_beam_search_params_say_what_is_wrong(fields, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(use_beam_search=True, **fields).validate(vocab_size=10)


@pytest.mark.parametrize(
    "fields", [{"beam_width": 4}, {"length_penalty": 2.0}, {"item_trie": "items"}]
)
def test_beam_fields_without_beam_search_are_refused(fields):
    with pytest.raises(ValueError, match=r"needs? use_beam_search"):
        SamplingParams(**fields).validate()
