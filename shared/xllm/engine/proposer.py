"""Proposer: where speculative decoding's draft tokens come from.

A proposer guesses the next few tokens of a decoding sequence; the target model then
verifies all of them in one forward pass (model_runner.py) and the sampler keeps the prefix
it agrees with (rejection_sampler.py). A proposer never changes a sequence: drafts ride on
the step's `ScheduledSeq.draft_token_ids` and enter `token_ids` only once accepted.

Contract of `propose(seq, max_tokens)`: return at most `max_tokens` token ids (possibly
none) guessed to follow `seq.token_ids`. Proposers here are deterministic — the same tokens
give the same drafts — which is what lets the rejection sampler treat a draft as a point
mass (accept it with probability p(draft)). A proposer that samples its drafts (a draft
model at temperature > 0) must also return their probabilities, and the sampler must use
them: a change to this interface, to be made when the first such proposer arrives.

A proposer that needs the whole batch at once (the draft model, draft_model.py) returns
placeholders here, only saying how many drafts it will give; the ModelRunner fills them in
before the step's forward pass, once the scheduler has allocated their slots.

Per-sequence state (an index of the tokens so far) may be kept by the proposer; it must be
freed when the sequence is (a `weakref.WeakKeyDictionary` keyed by the sequence does that),
and it must follow `token_ids` growing by any number of tokens between calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from xllm.config import EngineConfig
from xllm.engine.sequence import Sequence


class Proposer(ABC):
    @abstractmethod
    def propose(self, seq: Sequence, max_tokens: int) -> list[int]:
        """Up to `max_tokens` draft tokens to follow `seq.token_ids` (see the module doc)."""


def make_proposer(config: EngineConfig) -> Proposer | None:
    """The proposer `--speculative` names; None when speculation is off."""
    if not config.speculative:
        return None
    if config.speculative == "ngram":
        from xllm.engine.ngram_proposer import NgramProposer

        return NgramProposer(config.ngram_min, config.ngram_max)
    if config.speculative == "suffix":
        from xllm.engine.suffix_proposer import SuffixProposer

        return SuffixProposer(
            config.num_speculative_tokens,
            max_match=config.suffix_max_match,
            min_probability=config.suffix_min_probability,
            cache_nodes=config.suffix_cache_nodes,
        )
    if config.speculative == "draft":
        from xllm.engine.draft_model import DraftProposer

        return DraftProposer()  # the drafts themselves: ModelRunner's DraftModel
    raise ValueError(f"unknown speculative method {config.speculative!r}")
