"""SamplingSpec: the wire form of the engine's `SamplingParams`, carried by submits and commands.

One field per `SamplingParams` field, same name, same default, same meaning; `to_params()`
and `from_params()` convert both ways without loss. A test keeps the two in step: a field
added to the engine fails it until it is added here (and the carrying messages' versions
are bumped).

Validation stays with `SamplingParams.validate()`: the gateway validates before submitting,
the instance validates again on `to_params()` (it knows the vocabulary size).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm.engine.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True, kw_only=True)
class SamplingSpec:
    """How to turn logits into tokens for one request (see `SamplingParams` for details)."""

    n: int = 1
    """Number of completions; each streams with its own `TokenDelta.index`."""
    max_tokens: int = 16
    """Upper bound on generated tokens per completion."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens were generated."""
    temperature: float = 1.0
    """Softmax temperature; below 1e-5 means greedy."""
    top_k: int = 0
    """Keep the k most likely tokens; 0 or -1 disables."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's."""
    seed: int | None = None
    """Per-request seed for reproducible sampling; None = unseeded."""
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
    """Return the sampled token's logprob plus this many top alternatives; None = off."""

    def to_params(self) -> SamplingParams:
        """The engine's parameters (a fresh object; the engine may keep a reference)."""
        return SamplingParams(**_copy_lists(self))

    @classmethod
    def from_params(cls, params: SamplingParams) -> SamplingSpec:
        """The wire form of `params`."""
        return cls(**_copy_lists(params))


_FIELDS = SamplingSpec.__dataclass_fields__.keys()


def _copy_lists(obj: object) -> dict[str, object]:
    """Field values of `obj`, with lists copied so neither side aliases the other's."""
    values = {name: getattr(obj, name) for name in _FIELDS}
    values["stop_token_ids"] = list(values["stop_token_ids"])
    return values
