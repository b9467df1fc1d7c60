"""Workloads: the list of `BenchRequest`s a benchmark sends, with their prompts.

* `random`: synthetic prompts of `input_len` tokens (fixed, or uniform in `LO:HI`);
* `sharegpt`: real first-turn prompts from the ShareGPT sample in `data_dir()`;
* a trace (`azure-code`, `mooncake`, `burstgpt`, `burstgpt-3` or a file): lengths and arrival
  times from `load_trace`, synthetic prompts of exactly the traced input length;
* `multiturn_workload`: synthetic conversations in rounds, each turn's prompt extending the
  session's previous one, with the other sessions' turns in between (reuse at a distance).

How a synthetic prompt of N tokens is made (`PromptMaker`):

* with a local tokenizer: N random ordinary token ids of its vocabulary;
* without one: N random ids from `SAFE_TOKEN_IDS`;
* chat requests need text: the ids above decoded with the tokenizer, or without one N common
  English words (one token each in most BPE vocabularies), so about N tokens plus the chat
  template's own.

For `/v1/completions` the ids are sent as the prompt (OpenAI accepts a list of ints), so the
server sees exactly N tokens. Mooncake requests are built block by block: each `hash_ids`
entry maps to a fixed chunk (the same id always gives the same tokens), so requests sharing
leading hash ids share a prompt prefix and exercise prefix caching, as in the real trace.
"""

from __future__ import annotations

import gzip
import json
import random
from dataclasses import dataclass
from pathlib import Path

from xllm.cli.bench.traces import MOONCAKE_BLOCK_TOKENS, TraceRequest, data_dir, load_trace

SHAREGPT_FILE = "ShareGPT_V3_filtered_1000.json.gz"

SAFE_TOKEN_IDS = range(100, 3000)
"""Ids used without a tokenizer. NOTE: low ids are ordinary tokens in every common vocabulary
(special tokens sit at 0-2 or past the learned vocabulary) and fit our tiny 4k-token model."""

_COMMON_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their has been if more when "
    "will would who so no time can out up about into than them only some could new other"
)
_WORDS = _COMMON_WORDS.split()


@dataclass(frozen=True, slots=True)
class BenchRequest:
    prompt: str | list[int]
    """Text, or token ids for `/v1/completions`."""
    input_len: int
    """Prompt tokens intended (exact for token ids; an estimate for text)."""
    output_len: int
    """Output tokens to ask for, exactly (`max_tokens = min_tokens`, EOS ignored)."""
    arrival: float | None = None
    """Seconds after the start at which to send it; None = as soon as concurrency allows."""


@dataclass(frozen=True)
class LengthRange:
    """`N` or `LO:HI` (inclusive) from the command line."""

    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> LengthRange:
        low, _, high = str(text).partition(":")
        r = cls(int(low), int(high or low))
        if not 1 <= r.low <= r.high:
            raise ValueError(f"length {text!r}: want N or LO:HI with 1 <= LO <= HI")
        return r

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)


class PromptMaker:
    """Synthetic prompts of a given token length, as ids or (for chat) text."""

    def __init__(self, tokenizer_dir: str | Path | None = None, *, chat: bool, seed: int = 0):
        self.chat = chat
        self.seed = seed
        self.tokenizer = None
        self.ids = SAFE_TOKEN_IDS
        if tokenizer_dir:
            from xllm.tokenizer import Tokenizer

            self.tokenizer = Tokenizer(tokenizer_dir)
            self.ids = range(SAFE_TOKEN_IDS.start, _ordinary_vocab_size(self.tokenizer))

    def ids_for(self, n: int, rng: random.Random) -> list[int]:
        return [rng.choice(self.ids) for _ in range(n)]

    def make(self, n: int, rng: random.Random) -> str | list[int]:
        """A prompt of `n` tokens (ids), or about `n` tokens of text for chat."""
        return self.render(self.ids_for(n, rng))

    def render(self, ids: list[int]) -> str | list[int]:
        """`ids` as the prompt to send: as they are, or as text for chat."""
        if not self.chat:
            return ids
        if self.tokenizer is None:
            return " ".join(_WORDS[i % len(_WORDS)] for i in ids)
        # Decoding then encoding can merge tokens; trim back so it is at most len(ids).
        text = self.tokenizer.decode(ids)
        again = self.tokenizer.encode(text, add_special_tokens=False)[: len(ids)]
        return self.tokenizer.decode(again)

    def block(self, hash_id: int, size: int) -> list[int]:
        """The fixed token ids of one Mooncake prefix block (same id → same tokens)."""
        rng = random.Random(self.seed * 1_000_003 + hash_id)
        return self.ids_for(size, rng)


def _ordinary_vocab_size(tokenizer) -> int:
    """Ids below the first added/special token (those come last in the vocabularies we know)."""
    special = [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "</s>")]
    special = [i for i in special if i is not None and i > SAFE_TOKEN_IDS.start]
    return min([tokenizer.vocab_size, *special])


def random_workload(
    n: int, input_len: LengthRange, output_len: LengthRange, maker: PromptMaker, seed: int = 0
) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests = []
    for _ in range(n):
        length = input_len.sample(rng)
        requests.append(BenchRequest(maker.make(length, rng), length, output_len.sample(rng)))
    return requests


def sharegpt_workload(
    n: int, output_len: LengthRange, maker: PromptMaker, seed: int = 0
) -> list[BenchRequest]:
    """`n` ShareGPT prompts (shuffled, repeated if n > 1000) with sampled output lengths.

    The sample has no replies, so output lengths come from `output_len`. Input lengths are
    counted with the tokenizer when there is one, else estimated at 4 characters a token.
    """
    rng = random.Random(seed)
    with gzip.open(data_dir() / SHAREGPT_FILE, "rt") as f:
        texts = [r["conversations"][0]["value"] for r in json.load(f)]
    rng.shuffle(texts)
    requests = []
    for i in range(n):
        text = texts[i % len(texts)]
        length = _count_tokens(text, maker)
        requests.append(BenchRequest(text, length, output_len.sample(rng)))
    return requests


def multiturn_workload(
    sessions: int,
    turns: int,
    context_len: int,
    user_len: int,
    reply_len: int,
    maker: PromptMaker,
) -> list[BenchRequest]:
    """`sessions` conversations of `turns` turns, sent in rounds: turn 1 of every session,
    then turn 2 of every session, and so on.

    Turn k's prompt is the session's own context (`context_len` tokens: a document, a long
    system prompt), then turns 1..k-1 (each a `user_len`-token message and a `reply_len`-token
    stand-in for the reply: the real reply is not fed back, so its tokens are fixed ids, as a
    client resending the history would send the same text), then the k-th message. So turn k
    extends turn k-1's prompt, and the other sessions' turns come between the two: a prefix
    cache smaller than a round's prompts has evicted it by then, a larger tier has not.
    Each turn asks for `reply_len` tokens. Deterministic in `maker.seed`.
    """
    histories = [maker.block(_session_chunk(s, 0), context_len) for s in range(sessions)]
    requests = []
    for turn in range(1, turns + 1):
        for s, history in enumerate(histories):
            history += maker.block(_session_chunk(s, 2 * turn - 1), user_len)
            requests.append(BenchRequest(maker.render(list(history)), len(history), reply_len))
            history += maker.block(_session_chunk(s, 2 * turn), reply_len)
    return requests


def _session_chunk(session: int, index: int) -> int:
    """A `PromptMaker.block` id of its own for each chunk of each session (negative: apart
    from the trace's hash ids)."""
    return -(1 + session * 1_000 + index)


def _count_tokens(text: str, maker: PromptMaker) -> int:
    if maker.tokenizer is None:
        return max(1, round(len(text) / 4))
    return len(maker.tokenizer.encode(text, add_special_tokens=False))


def trace_workload(
    name_or_path: str, maker: PromptMaker, seed: int = 0, **trace_options
) -> list[BenchRequest]:
    """One request per trace row, arriving at the trace's (scaled) time.

    `trace_options` go to `load_trace` (limit, start, duration, time_scale, length_scale).
    """
    trace = load_trace(name_or_path, **trace_options)
    return requests_from_trace(trace, maker, trace_options.get("length_scale", 1.0), seed)


def requests_from_trace(
    trace: list[TraceRequest], maker: PromptMaker, length_scale: float = 1.0, seed: int = 0
) -> list[BenchRequest]:
    """`trace_workload` for trace rows already loaded (and perhaps filtered) by the caller.

    `length_scale` must be the one the rows were loaded with: a Mooncake prefix block becomes
    `round(512 * length_scale)` tokens. Keep that a multiple of the server's KV block size
    (16 tokens: length scales 1/32, 1/16, 1/8, ...): otherwise a shared prefix ends inside a
    KV block, and that block's shared tokens are recomputed.
    """
    rng = random.Random(seed)
    block_size = max(1, round(MOONCAKE_BLOCK_TOKENS * length_scale))
    requests = []
    for t in trace:
        ids = _block_ids(t, maker, block_size) if t.hash_ids else maker.ids_for(t.input_len, rng)
        prompt = maker.render(ids)
        requests.append(BenchRequest(prompt, t.input_len, t.output_len, t.arrival))
    return requests


def _block_ids(t: TraceRequest, maker: PromptMaker, block_size: int) -> list[int]:
    """The request's prompt from its prefix blocks, cut to its input length."""
    ids: list[int] = []
    for hash_id in t.hash_ids:
        ids += maker.block(hash_id, block_size)
    ids += maker.ids_for(max(0, t.input_len - len(ids)), random.Random(len(ids)))
    return ids[: t.input_len]
