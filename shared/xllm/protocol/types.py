"""The plain value types every layer shares, defined once: sampling, logprobs, roles, requests.

    SamplingParams   how one request turns logits into tokens, and `validate()`
    StructuredOutput a grammar the output must follow (JSON schema, regex, choice, EBNF)
    Logprob          one sampled token's logprob and its top alternatives
    Role             an instance's role: prefill, decode or both
    ImageData        one image of a request, as the gateway checked it
    RequestSpec      what a client asked for, as the gateway validated it

The gateway builds them from HTTP, the messages carry them as they are (nested dataclasses
travel as maps, NamedTuples as arrays, StrEnums as their string), and the engine computes
with them: there is no wire twin to convert to and from. They import nothing but the
standard library, so the engine can import them from here and the protocol imports nothing
from the engine.

Changing a field here changes every message that nests the type: bump those messages'
versions (`codec` module docstring).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

GREEDY_EPSILON = 1e-5
"""Temperatures below this are treated as greedy (argmax), as vLLM does."""
MAX_LOGPROBS = 20
"""Most top alternatives a request may ask for per token."""
MAX_BEAM_WIDTH = 256
"""Widest beam search a request may ask for."""


class StructuredKind(enum.StrEnum):
    """What `StructuredOutput.spec` holds; a StrEnum, so it travels as its string."""

    JSON = "json"
    """A JSON schema, as JSON text (OpenAI's `json_schema`, vLLM's `json`)."""
    JSON_OBJECT = "json_object"
    """Any JSON object (OpenAI's `json_object`); `spec` is empty."""
    REGEX = "regex"
    """A regular expression the whole output matches."""
    CHOICE = "choice"
    """One of a list of strings, given as a JSON array of strings."""
    GRAMMAR = "grammar"
    """An EBNF grammar (xgrammar's / GBNF dialect, rule `root` first)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StructuredOutput:
    """A constraint on the generated text: every token is sampled from those the grammar
    allows next, and the completion ends ("stop") when the grammar is complete and the
    model's EOS follows. The gateway checks `spec` parses; engines compile it against their
    tokenizer (cached by (kind, spec))."""

    kind: StructuredKind
    """What `spec` is."""
    spec: str = ""
    """The schema, regex, choices or grammar, as text (see `StructuredKind`)."""
    num_replayed_tokens: int = 0
    """How many trailing prompt tokens are output already generated under this grammar: a
    request resumed on another instance carries the tokens streamed so far at the end of its
    prompt, and the grammar must continue from after them."""

    @property
    def key(self) -> tuple[StructuredKind, str]:
        """What a compiled grammar depends on (not on how far a request got)."""
        return (self.kind, self.spec)


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingParams:
    """How one request turns logits into tokens.

    Field names and defaults follow the OpenAI API and vLLM, so a request body maps onto
    them one to one (the gateway reads each field from the body field of the same name).
    Frozen: the engine keeps a reference to the object it was given.
    """

    n: int = 1
    """Number of completions for the prompt; they share the prompt's KV blocks, and each
    streams with its own `TokenDelta.index`."""
    max_tokens: int = 16
    """Upper bound on generated tokens per completion (the context length may cut it
    shorter)."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens were generated."""
    temperature: float = 1.0
    """Softmax temperature; below `GREEDY_EPSILON` means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens, whatever else is batched;
    None = unseeded."""
    repetition_penalty: float = 1.0
    """Multiplicative penalty on tokens already in prompt or output (1.0 = off)."""
    presence_penalty: float = 0.0
    """Additive penalty on tokens already generated at least once (0.0 = off)."""
    frequency_penalty: float = 0.0
    """Additive penalty proportional to how often a token was generated (0.0 = off)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a completion (finish_reason "stop"), besides EOS."""
    logprobs: int | None = None
    """Return the sampled token's logprob and this many top alternatives (0 = only the
    token); None = off."""
    structured: StructuredOutput | None = None
    """A grammar the output must follow (response_format / structured_outputs); None = free
    text."""
    use_beam_search: bool = False
    """Beam search instead of sampling (engine/beam_search.py): `beam_width` beams decode in
    the batch and the best `n` are returned, each with its cumulative logprob, at the end
    (no streaming). Deterministic: temperature, top-k/p, min-p and seed do not apply."""
    beam_width: int = 0
    """Beams kept per step; 0 = `n` (vLLM's OpenAI server uses `n` as the width)."""
    length_penalty: float = 1.0
    """Beam scores are cumulative logprob / output length ** length_penalty (transformers'
    semantics: > 0 favours longer beams, < 0 shorter ones)."""
    early_stopping: Literal[False, True, "never"] = False
    """When beam search stops (transformers' semantics): True = as soon as `beam_width`
    beams finished; False = when no running beam can beat the worst finished one at its
    current length; "never" = only when none can at any length up to max_tokens."""
    item_trie: str | None = None
    """Beam search over valid items: the name of a trie of allowed token sequences the
    instance registered (`--item-trie NAME=PATH`); every token must extend a prefix of an
    item, and a beam finishes only as a complete item."""
    allowed_items: list[list[int]] | None = None
    """As `item_trie`, the allowed token sequences given inline."""

    @property
    def greedy(self) -> bool:
        """Argmax decoding; beam search is deterministic too (its rows' argmax is unused)."""
        return self.temperature < GREEDY_EPSILON or self.use_beam_search

    @property
    def allows_speculation(self) -> bool:
        """Whether draft tokens may be proposed and verified for this request. NOTE: not
        with a grammar: drafts are not checked against it, and its matcher advances one
        sampled token at a time, so constrained requests always decode token by token."""
        return self.structured is None and not self.use_beam_search

    @property
    def num_beams(self) -> int:
        """The beam width of a beam search (0 for sampling)."""
        return (self.beam_width or self.n) if self.use_beam_search else 0

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise `ValueError` with a message fit to show a user, starting with the name of
        the offending field, when the parameters are out of range (stop token ids only when
        `vocab_size` is given)."""
        for ok, message in self._checks():
            if not ok:
                raise ValueError(message)
        if vocab_size is not None:
            bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
            if bad:
                raise ValueError(
                    f"stop_token_ids {bad} are outside the vocabulary [0, {vocab_size})"
                )
            if self.allowed_items is not None and any(
                not 0 <= t < vocab_size for item in self.allowed_items for t in item
            ):
                raise ValueError(f"allowed_items token ids must be in [0, {vocab_size})")

    def _checks(self) -> list[tuple[bool, str]]:
        return [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.min_tokens <= self.max_tokens,
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                0.0 <= self.temperature <= 100.0,
                f"temperature must be in [0, 100], got {self.temperature}",
            ),
            (self.top_k >= -1, f"top_k must be -1 (disabled) or positive, got {self.top_k}"),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}"),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}"),
            (
                0.0 < self.repetition_penalty <= 10.0,
                f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}",
            ),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}",
            ),
            (
                self.structured is None or self.structured.num_replayed_tokens >= 0,
                "structured.num_replayed_tokens must be non-negative",
            ),
            *self._beam_checks(),
        ]

    def _beam_checks(self) -> list[tuple[bool, str]]:
        if not self.use_beam_search:
            return [
                (
                    self.beam_width == 0 or self.beam_width == 1,
                    "beam_width needs use_beam_search",
                ),
                (self.length_penalty == 1.0, "length_penalty needs use_beam_search"),
                (self.early_stopping is False, "early_stopping needs use_beam_search"),
                (
                    self.item_trie is None and self.allowed_items is None,
                    "item_trie / allowed_items need use_beam_search",
                ),
            ]
        width = self.num_beams
        items = self.allowed_items
        return [
            (
                1 <= width <= MAX_BEAM_WIDTH,
                f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}",
            ),
            (self.n <= width, f"n ({self.n}) must not exceed beam_width ({width})"),
            (self.structured is None, "use_beam_search cannot be combined with structured output"),
            (not self.has_penalties, "use_beam_search cannot be combined with penalties"),
            (self.logprobs is None, "use_beam_search returns cumulative logprobs, not logprobs"),
            (
                self.early_stopping in (False, True, "never"),
                f'early_stopping must be true, false or "never", got {self.early_stopping!r}',
            ),
            (
                -10.0 <= self.length_penalty <= 10.0,
                f"length_penalty must be in [-10, 10], got {self.length_penalty}",
            ),
            (
                self.item_trie is None or items is None,
                "give item_trie or allowed_items, not both",
            ),
            (
                items is None or (len(items) > 0 and all(len(item) > 0 for item in items)),
                "allowed_items must be a non-empty list of non-empty token id lists",
            ),
        ]


class Logprob(NamedTuple):
    """The logprob of one sampled token; a NamedTuple, so it travels as a 3-element array
    and keeps token deltas small."""

    token_id: int
    """The sampled token."""
    logprob: float
    """Its log-probability under the raw (unpenalized, temperature 1) distribution."""
    top: dict[int, float]
    """The `logprobs` most likely tokens: token id -> log-probability (empty if 0 asked)."""


class Role(enum.StrEnum):
    """An instance's role. A StrEnum: it travels as its string and compares equal to it."""

    PREFILL = "prefill"
    """Prefill only: computes prompts and sends their KV to decode instances."""
    DECODE = "decode"
    """Decode only: takes prefilled requests and generates their tokens."""
    BOTH = "both"
    """PD-colocated (the default): a request runs from prompt to finish here."""
    ENCODE = "encode"
    """Encoder only (`services.encoder`): runs the vision tower, never a request's tokens."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ImageData:
    """One image of a request, as the gateway received and checked it (it decodes, and is
    within the size limits). For now the encoded file travels in the request itself; an
    encoder service will move embeddings out of band instead."""

    data: bytes
    """The encoded image file (PNG, JPEG, WebP, ...), as the client sent it. Kept when an
    encoder made the embeddings: if they cannot be read (the encoder died), the instance
    encodes the file itself."""
    num_tokens: int
    """Language-model tokens it becomes (its placeholders in `prompt_token_ids`)."""
    embedding: EmbeddingRef | None = None
    """Set by the scheduler when an encoder instance made the image's embeddings: the
    instance reads them out of band (Mooncake) instead of running the vision tower."""
    content_hash: int = 0
    """The image's content hash as the engine computes it (`image_processor.image_hash` of
    the resized pixels), set by the gateway: the scheduler's prefix hashes see the image's
    placeholders as the engine's block hashes do; 0 = unknown (they stop at the image)."""
    offset: int = -1
    """Index of the image's first placeholder in `prompt_token_ids`; -1 = unknown."""


@dataclass(frozen=True, slots=True, kw_only=True)
class EmbeddingRef:
    """Where one image's embeddings sit in an encoder instance's memory: the descriptor
    that goes over NATS while the bytes move through the Mooncake Transfer Engine."""

    endpoint: str
    """The encoder's Mooncake endpoint (host:rpc_port)."""
    addr: int
    """Address of the embeddings in the encoder's registered memory."""
    nbytes: int
    """Bytes to read from `addr`."""
    shape: list[int]
    """[tokens, hidden] of the embeddings."""
    dtype: str
    """torch dtype name (e.g. "float32")."""
    grid_thw: list[int]
    """The image's patch grid (time, height, width), for M-RoPE positions."""
    content_hash: int
    """The image's content hash (the encoder's cache key; the prefix cache's identity)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestSpec:
    """What a client asked for, as the gateway validated and tokenized it. The submit and
    every command that starts work on a request nest it unchanged, next to their own
    `request_id` (an attempt's id) and routing fields."""

    prompt_token_ids: list[int]
    """The tokenized prompt (chat template applied)."""
    sampling: SamplingParams
    """How to sample; validated by the gateway (and checked again by the engine that runs
    it, against its own vocabulary)."""
    priority: int = 0
    """0 = online; > 0 = offline / best-effort, preempted by online work first (larger =
    less urgent)."""
    model: str | None = None
    """The model the client asked for; only instances serving it are candidates. None =
    any."""
    images: list[ImageData] = field(default_factory=list)
    """The prompt's images, in the order of their placeholder runs in `prompt_token_ids`
    (each run already `num_tokens` long); empty for text."""
