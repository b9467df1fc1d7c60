"""Stop strings: cut before the first match, also across deltas and token boundaries."""

from __future__ import annotations

from services.gateway.detokenizer import StopStrings
from services.gateway.streaming import CompletionText, GenerationRequest
from xllm.protocol import SamplingParams, TokenDelta


def run(stops: StopStrings, pieces: list[str]) -> str:
    return "".join(stops.push(p) for p in pieces)


def test_no_stop_strings_pass_through():
    stops = StopStrings()
    assert stops.push("abc") == "abc" and stops.flush() == ""


def test_cut_before_the_stop_string_across_pushes():
    stops = StopStrings(["STOP"])
    assert run(stops, ["hello S", "T", "OP and more"]) == "hello "
    assert stops.matched == "STOP"
    assert stops.push("later") == "" and stops.flush() == ""


def test_include_stop_string():
    stops = StopStrings(["STOP"], include_in_output=True)
    assert run(stops, ["hello ST", "OP more"]) == "hello STOP"


def test_partial_match_is_held_then_released():
    stops = StopStrings(["abc"])
    assert stops.push("xxab") == "xx"  # "ab" may become "abc"
    assert stops.push("d") == "abd"
    assert stops.push("a") == ""
    assert stops.flush() == "a"  # the completion ended: the tail was not a stop string
    assert stops.matched is None


def test_earliest_of_several_stop_strings_wins():
    stops = StopStrings(["world", "lo w", ""])
    assert stops.push("hello world") == "hel"
    assert stops.matched == "lo w"


def test_only_the_tail_that_can_still_match_is_held():
    stops = StopStrings(["</end>"])
    assert stops.push("a < b") == "a < b"
    assert stops.push(" </e") == " "
    assert stops.flush() == "</e"


def _completion(model_info, stop=(), include=False, skip_special=True) -> CompletionText:
    req = GenerationRequest(
        request_id="cmpl-x",
        model="tiny",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(),
        stop=tuple(stop),
        include_stop_str_in_output=include,
        skip_special_tokens=skip_special,
    )
    return CompletionText(0, model_info, req)


def _feed(completion: CompletionText, tokens: list[int], finish="length") -> list:
    outs = []
    for i, t in enumerate(tokens):
        last = i == len(tokens) - 1
        delta = TokenDelta(
            request_id="cmpl-x", token_ids=[t], finish_reason=finish if last else None
        )
        outs.append(completion.feed(delta))
        if completion.finish_reason is not None:
            break
    return outs


def test_stop_string_across_token_boundaries(model_info):
    tok = model_info.tokenizer
    ids = tok.encode("Hello world, this is the end.")
    stop = "world, th"
    assert not any(stop in tok.decode([t]) for t in ids)  # it spans tokens
    completion = _completion(model_info, stop=[stop])
    outs = _feed(completion, ids)
    assert "".join(o.text for o in outs) == "Hello "
    assert outs[-1].finish_reason == "stop" and completion.finish_reason == "stop"
    assert len(outs) < len(ids)  # stopped before the engine did


def test_engine_stop_token_is_not_text_unless_asked(model_info):
    tok = model_info.tokenizer
    ids = [*tok.encode("Hi there"), tok.token_to_id("<|im_end|>")]
    for include, expected in ((False, "Hi there"), (True, "Hi there<|im_end|>")):
        completion = _completion(model_info, include=include, skip_special=False)
        outs = _feed(completion, ids, finish="stop")
        assert "".join(o.text for o in outs) == expected
        assert outs[-1].finish_reason == "stop"


def test_held_text_is_flushed_at_the_end(model_info):
    tok = model_info.tokenizer
    ids = tok.encode("value: </e")
    outs = _feed(_completion(model_info, stop=["</end>"]), ids, finish="length")
    assert "".join(o.text for o in outs) == "value: </e"
    assert outs[-1].finish_reason == "length"


def test_a_stop_string_inside_a_multi_token_delta_drops_the_tokens_after_it(model_info):
    tok = model_info.tokenizer
    ids = tok.encode("Hello world, this is the end.")
    stop = "world, th"
    one_by_one = _completion(model_info, stop=[stop])
    singles = _feed(one_by_one, ids)
    for size in (2, 3, len(ids)):
        completion = _completion(model_info, stop=[stop])
        outs = []
        for start in range(0, len(ids), size):
            delta = TokenDelta(request_id="cmpl-x", token_ids=ids[start : start + size])
            outs.append(completion.feed(delta))
            if completion.finish_reason is not None:
                break
        assert "".join(o.text for o in outs) == "Hello "
        assert completion.finish_reason == "stop"
        assert [t for o in outs for t in o.token_ids] == [t for o in singles for t in o.token_ids]


def test_a_multi_token_delta_ending_in_the_stop_token(model_info):
    tok = model_info.tokenizer
    ids = [*tok.encode("Hi there"), tok.token_to_id("<|im_end|>")]
    completion = _completion(model_info, skip_special=False)
    out = completion.feed(TokenDelta(request_id="cmpl-x", token_ids=ids, finish_reason="stop"))
    assert out.text == "Hi there" and out.finish_reason == "stop" and out.token_ids == ids
