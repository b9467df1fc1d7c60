"""Structured output on the tiny random model: its samples follow a JSON schema, a regex or
a choice only because the grammar masks every other token. Also across a PD handoff and a
resume from the streamed tokens, where a fresh matcher must continue the grammar."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from conftest import handed_over, make_engine, random_prompts

from xllm.engine.engine import Engine
from xllm.engine.grammar import GrammarCache, grammar_of
from xllm.protocol.types import SamplingParams, StructuredKind, StructuredOutput
from xllm.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("overlap")  # every test: sync and async steps

SCHEMA = {
    "type": "object",
    "properties": {
        # NOTE: `pattern`, not maxLength: xgrammar 0.2.9's bounded strings admit raw control
        # characters (invalid JSON) and mask ~50x slower.
        "name": {"type": "string", "pattern": "^[a-z]{1,8}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "ok"],
    "additionalProperties": False,
}
JSON_SCHEMA = StructuredOutput(kind=StructuredKind.JSON, spec=json.dumps(SCHEMA))
REGEX = r"[a-z]{2,5}-\d{1,3}"
CHOICES = ["yes", "no", "maybe so", 'say "hi"']


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return str(tiny_model_dir("qwen3"))


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return Tokenizer(model_dir)


@pytest.fixture
def engine(model_dir):
    return make_engine(model_dir)


def sample(structured: StructuredOutput, seed: int, max_tokens: int = 96, **kw) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0, seed=seed, structured=structured, **kw
    )


def run(engine: Engine, prompts, params_list) -> dict[str, tuple[list[int], str]]:
    """{request id: (output tokens, finish reason)} of all requests, batched together."""
    for i, (prompt, params) in enumerate(zip(prompts, params_list, strict=True)):
        engine.add_request(str(i), prompt, params)
    outputs: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}
    while engine.has_unfinished():
        for delta in engine.step():
            key = delta.request_id if delta.index == 0 else f"{delta.request_id}/{delta.index}"
            outputs.setdefault(key, []).extend(delta.token_ids)
            if delta.finish_reason is not None:
                reasons[key] = delta.finish_reason
    return {key: (tokens, reasons[key]) for key, tokens in outputs.items()}


def prompts(engine: Engine, count: int, seed: int = 0) -> list[list[int]]:
    return random_prompts([12] * count, engine.model_config.vocab_size, seed)


def test_fifty_sampled_completions_follow_the_json_schema(engine, tokenizer):
    results = run(engine, prompts(engine, 50), [sample(JSON_SCHEMA, seed) for seed in range(50)])
    assert len(results) == 50
    for tokens, reason in results.values():
        assert reason == "stop" and tokens[-1] in engine.model_config.eos_token_ids
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


def test_regex_and_choice_hold_for_every_sample(engine, tokenizer):
    regex = StructuredOutput(kind=StructuredKind.REGEX, spec=REGEX)
    choice = StructuredOutput(kind=StructuredKind.CHOICE, spec=json.dumps(CHOICES))
    params = [sample(regex, seed) for seed in range(20)] + [sample(choice, s) for s in range(20)]
    results = run(engine, prompts(engine, 40, seed=1), params)
    texts = [tokenizer.decode(results[str(i)][0]) for i in range(40)]
    assert all(results[str(i)][1] == "stop" for i in range(40))
    assert all(re.fullmatch(REGEX, text) for text in texts[:20]), texts[:20]
    assert all(text in CHOICES for text in texts[20:]), texts[20:]
    assert len(set(texts[20:])) > 1  # sampled, not stuck on one answer


def test_json_object_completions_that_finish_are_objects(engine, tokenizer):
    """Any object: strings are unbounded, so a random model often runs out of tokens inside
    one; every completion that ends must be a JSON object (greedy, to end more often)."""
    json_object = StructuredOutput(kind=StructuredKind.JSON_OBJECT)
    params = SamplingParams(max_tokens=64, temperature=0.0, structured=json_object)
    results = run(engine, prompts(engine, 20, seed=2), [params] * 20)
    finished = [tokens for tokens, reason in results.values() if reason == "stop"]
    assert len(finished) >= 5
    for tokens in finished:
        assert isinstance(json.loads(tokenizer.decode(tokens)), dict)
    for tokens, reason in results.values():
        assert reason in ("stop", "length") and tokenizer.decode(tokens).startswith("{")


def test_n_completions_each_follow_the_grammar(engine, tokenizer):
    """Forks share the prompt's logits row but each has its own matcher."""
    (prompt,) = prompts(engine, 1, seed=3)
    results = run(engine, [prompt], [sample(JSON_SCHEMA, seed=5, n=4)])
    assert len(results) == 4
    for tokens, reason in results.values():
        assert reason == "stop"
        jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


def test_requests_without_a_grammar_are_unchanged_beside_constrained_ones(model_dir):
    free = [SamplingParams(max_tokens=12, temperature=1.0, seed=s, ignore_eos=True) for s in (1, 2)]
    alone_engine = make_engine(model_dir)
    batch = prompts(alone_engine, 4, seed=4)
    alone = run(alone_engine, batch[:2], free)
    mixed = run(make_engine(model_dir), batch, free + [sample(JSON_SCHEMA, 3)] * 2)
    assert [mixed[k] for k in ("0", "1")] == [alone[k] for k in ("0", "1")]


def test_a_grammar_survives_a_pd_handoff(model_dir, tokenizer):
    """The prefill engine samples the first token under the grammar; the decode engine's
    fresh matcher advances past it and continues: the seeded output is the colocated one."""
    params = sample(JSON_SCHEMA, seed=11)
    prefill, decode = make_engine(model_dir), make_engine(model_dir)
    (prompt,) = prompts(prefill, 1, seed=5)
    alone, reason = run(make_engine(model_dir), [prompt], [params])["0"]
    assert reason == "stop"

    committed, tokens = handed_over(prefill, decode, prompt, params)
    assert committed is None
    assert tokens == alone
    jsonschema.validate(json.loads(tokenizer.decode(tokens)), SCHEMA)


@pytest.mark.parametrize("k", [1, 7])
def test_a_grammar_resumes_after_the_streamed_tokens(model_dir, tokenizer, k):
    """The gateway resumes a lost request with the streamed tokens appended to the prompt
    and `num_replayed_tokens` saying how many: the matcher replays them, and the rest of
    the output is what the first instance would have produced."""
    engine = make_engine(model_dir)
    (prompt,) = prompts(engine, 1, seed=6)
    alone, _ = run(engine, [prompt], [sample(JSON_SCHEMA, seed=21)])["0"]
    resumed_grammar = StructuredOutput(
        kind=StructuredKind.JSON, spec=JSON_SCHEMA.spec, num_replayed_tokens=k
    )
    rest_params = sample(resumed_grammar, seed=21, max_tokens=96 - k)
    rest, reason = run(make_engine(model_dir), [prompt + alone[:k]], [rest_params])["0"]
    assert reason == "stop" and rest == alone[k:]
    jsonschema.validate(json.loads(tokenizer.decode(alone[:k] + rest)), SCHEMA)


def test_a_bad_spec_or_replay_rejects_that_request_alone(engine, tokenizer):
    bad = StructuredOutput(kind=StructuredKind.JSON, spec='{"type": "objec"}')
    with pytest.raises(ValueError, match="objec"):
        engine.add_request("bad", [5, 6, 7], sample(bad, 0))
    not_json = tokenizer.encode("hello", add_special_tokens=False)
    replay = StructuredOutput(
        kind=StructuredKind.JSON, spec=JSON_SCHEMA.spec, num_replayed_tokens=1
    )
    with pytest.raises(ValueError, match="breaks the grammar"):
        engine.add_request("replay", [5, 6, *not_json[:1]], sample(replay, 0))
    too_many = StructuredOutput(kind=StructuredKind.REGEX, spec="a", num_replayed_tokens=3)
    with pytest.raises(ValueError, match="num_replayed_tokens"):
        engine.add_request("long", [5, 6, 7], sample(too_many, 0))
    assert not engine.has_unfinished() and not engine.sequences


def test_min_tokens_yields_when_the_grammar_can_only_end(engine, tokenizer):
    choice = StructuredOutput(kind=StructuredKind.CHOICE, spec=json.dumps(["yes"]))
    ((tokens, reason),) = run(
        engine, prompts(engine, 1), [sample(choice, 0, min_tokens=10)]
    ).values()
    assert reason == "stop" and tokenizer.decode(tokens) == "yes"


def test_compiled_grammars_are_cached_least_recently_used_first(model_dir):
    cache = GrammarCache(model_dir, 4032, [3999], capacity=2)
    a, b, c = (StructuredOutput(kind=StructuredKind.REGEX, spec=s) for s in "abc")
    first = cache.compiled(a)
    cache.compiled(b)
    resumed_a = StructuredOutput(kind=StructuredKind.REGEX, spec="a", num_replayed_tokens=2)
    assert cache.compiled(resumed_a) is first  # the key ignores how far a request got
    cache.compiled(c)  # evicts b, the least recently used
    assert cache.compiled(a) is first
    assert list(cache._compiled) == [c.key, a.key]


@pytest.mark.parametrize(
    ("kind", "spec", "message"),
    [
        (StructuredKind.JSON, '{"type": ', "Failed to parse JSON"),
        (StructuredKind.REGEX, "[a-z", "Unclosed"),
        (StructuredKind.CHOICE, "[]", "non-empty array of strings"),
        (StructuredKind.GRAMMAR, 'root ::= "a" | ', "EBNF"),
    ],
)
def test_grammar_of_explains_a_bad_spec(kind, spec, message):
    with pytest.raises(ValueError, match=message) as e:
        grammar_of(StructuredOutput(kind=kind, spec=spec))
    assert not str(e.value).startswith("[")  # xgrammar's time and source line are cut off
