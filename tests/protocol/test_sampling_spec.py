"""SamplingSpec mirrors the engine's SamplingParams field for field and converts losslessly."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.engine.sampling_params import SamplingParams
from xllm.protocol import GenerateCmd, SamplingSpec, decode, encode


def _fields(cls) -> dict[str, object]:
    return {f.name: f.type for f in dataclasses.fields(cls)}


def test_same_fields_and_annotations_as_the_engine():
    """A field added to SamplingParams must be added to SamplingSpec (and versions bumped)."""
    assert _fields(SamplingSpec) == _fields(SamplingParams)


def test_same_defaults_as_the_engine():
    assert SamplingSpec().to_params() == SamplingParams()
    assert SamplingSpec.from_params(SamplingParams()) == SamplingSpec()


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
)


@settings(max_examples=50, deadline=None)
@given(params=params_strategy)
def test_params_round_trip_through_the_wire(params):
    cmd = GenerateCmd(
        request_id="r", prompt_token_ids=[1], sampling=SamplingSpec.from_params(params)
    )
    back = decode(encode(cmd)).sampling.to_params()
    assert back == params


def test_conversions_do_not_alias_lists():
    params = SamplingParams(stop_token_ids=[7])
    spec = SamplingSpec.from_params(params)
    params.stop_token_ids.append(8)
    assert spec.stop_token_ids == [7]
    engine_side = spec.to_params()
    engine_side.stop_token_ids.append(9)
    assert spec.stop_token_ids == [7]
