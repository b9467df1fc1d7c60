"""Speculation: which sequences may speculate, and whether speculating pays this step.

A speculative step verifies each decoding sequence's drafts in the same forward pass as
its last token: 1 + k rows instead of 1, through the multi-token paged attention instead of
the one-row decode one (and, with a draft model, the draft's passes). It pays when the accepted drafts outweigh that extra
cost — at batch 1 on a memory-bound model, k + 1 rows cost about what 1 row does; at a
large batch the step is compute-bound and the rejected rows are pure loss (llama.cpp's
lookup decoding loses from 4 slots on). So the engine decides per step, from measurements:

  * step cost: two least-squares lines of step seconds against tokens in the step, one over
    plain decode steps (`plain`, x = batch size) and one over speculative ones
    (`speculative`, x = batch size + drafts), exponentially weighted so they follow drift;
  * yield: the acceptance rate a (accepted / proposed drafts) and the drafts per decoding
    sequence q (sequences without a match count 0) over recent speculative steps.

The rule (`speculation_pays`), at batch size B:

    tokens/s on  = B (1 + a q) / speculative(B (1 + q))
    tokens/s off = B / plain(B)
    speculate iff on > (1 + MARGIN) x off

Until both lines have MIN_POINTS steps, the missing mode is run (speculative first); then
the mode the rule did not pick runs now and then (an exploration step), so both lines and
the acceptance rate stay current as the batch and the requests change. Exploring is priced:
the worse mode's step loses `loss = max(r, 1/r) - 1` of a step (r = on / off, predicted), so
the next exploration comes at least `loss / EXPLORE_BUDGET` steps later (its expected cost
stays under EXPLORE_BUDGET of the time; at least EXPLORE_EVERY), and each exploration that
leaves the rule's pick unchanged doubles the interval (up to MAX_EXPLORE_EVERY): with
acceptance near 0, speculation is tried ever more rarely. When the pick flips (the batch
or the yield changed), the intervals start over from the least. An exploration whose
step could not be measured (it prefilled, see below) runs again on the next step, a few
times at most.

Only steps that decode and prefill nothing are measured: a prefill chunk's cost says nothing
about decoding. A draft model's catch-up (its KV of the tokens decoded while speculation
was off, recomputed on the step speculation turns back on: draft_model.py) is a one-off
cost of switching, not of speculating: it is left out of that step's time. When
the rule says no, the step is the plain path unchanged: the proposer is not called, and
the draft model computes nothing (not even the KV of new prompt chunks).

Eligibility (`can_speculate`): requests with penalties, pending min_tokens, logprobs,
n > 1 or a grammar (`SamplingParams.allows_speculation`) never speculate (see
rejection_sampler.py), nor do prefill-only ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from xllm.engine.sequence import Sequence

MARGIN = 0.05
"""Speculation must be expected this much faster to run: near a tie, the plain path."""
MIN_POINTS = 3
"""Steps each mode is measured on before the rule decides."""
EXPLORE_EVERY = 32
"""Steps until the first exploration of the mode the rule did not pick (module doc)."""
MAX_EXPLORE_EVERY = 4096
"""The longest interval between explorations, however often they fail."""
EXPLORE_BUDGET = 0.01
"""The share of the time exploration may be expected to lose (sets its least interval)."""
EXPLORE_RETRIES = 3
"""Steps an exploration is tried again on when its step prefilled (was not measured)."""
DECAY = 0.98
"""Weight left to the older measurements per new one (~50 steps matter)."""


def can_speculate(seq: Sequence) -> bool:
    """Whether `seq`'s sampling lets the rejection sampler verify drafts (module doc)."""
    p = seq.params
    return (
        p.n == 1
        and p.allows_speculation
        and p.logprobs is None
        and not p.has_penalties
        and seq.num_output_tokens >= p.min_tokens
        and not seq.prefill_only
    )


def draft_room(seq: Sequence, max_drafts: int, budget: int, max_model_len: int) -> int:
    """How many drafts a decoding `seq` may verify this step: at most `max_drafts`, leaving
    room in the step's token budget, the context and its max_tokens for its last token and
    for the target's token after the drafts; 0 if it cannot speculate."""
    if seq.num_output_tokens == 0 or not can_speculate(seq):
        return 0  # (a prompt's last chunk samples its first token plainly)
    return min(
        max_drafts,
        budget - 1,
        max_model_len - seq.num_tokens - 1,
        seq.params.max_tokens - seq.num_output_tokens - 1,
    )


@dataclass
class LineFit:
    """Exponentially weighted least squares of y = intercept + slope * x."""

    sw: float = 0.0
    sx: float = 0.0
    sy: float = 0.0
    sxx: float = 0.0
    sxy: float = 0.0
    count: int = 0
    """Points added (not weighted)."""

    def add(self, x: float, y: float) -> None:
        self.sw = self.sw * DECAY + 1.0
        self.sx = self.sx * DECAY + x
        self.sy = self.sy * DECAY + y
        self.sxx = self.sxx * DECAY + x * x
        self.sxy = self.sxy * DECAY + x * y
        self.count += 1

    def predict(self, x: float) -> float:
        """The fitted y at x (0 before any point). With a single x seen so far, the mean y:
        constant near that x. The slope is never negative: more tokens never cost less,
        whatever the noise says."""
        if self.sw == 0.0:
            return 0.0
        mx, my = self.sx / self.sw, self.sy / self.sw
        var = self.sxx / self.sw - mx * mx
        if var <= 1e-9 * (1.0 + mx * mx):
            return my
        slope = max(0.0, (self.sxy / self.sw - mx * my) / var)
        return my + slope * (x - mx)


def speedup(
    batch_size: int,
    acceptance_rate: float,
    drafts_per_seq: float,
    plain: LineFit,
    speculative: LineFit,
) -> float:
    """Expected tokens per second with drafts over without (the module doc's on / off)."""
    time_off = plain.predict(batch_size)
    time_on = speculative.predict(batch_size * (1.0 + drafts_per_seq))
    if time_on <= 0.0 or time_off <= 0.0:
        return 1.0
    return (1.0 + acceptance_rate * drafts_per_seq) * time_off / time_on


def speculation_pays(
    batch_size: int,
    acceptance_rate: float,
    drafts_per_seq: float,
    plain: LineFit,
    speculative: LineFit,
    margin: float = MARGIN,
) -> bool:
    """The rule of the module doc: expected tokens per second with and without drafts."""
    ratio = speedup(batch_size, acceptance_rate, drafts_per_seq, plain, speculative)
    return ratio > 1.0 + margin


def priced_interval(ratio: float) -> int:
    """The fewest steps between explorations for the worse mode's step (`ratio` = on / off
    speed) to be expected to lose no more than EXPLORE_BUDGET of the time."""
    loss = max(ratio, 1.0 / ratio) - 1.0 if ratio > 0.0 else float("inf")
    return int(min(MAX_EXPLORE_EVERY, loss / EXPLORE_BUDGET))


def exploration_interval(interval: int, ratio: float) -> int:
    """Steps to the next exploration after one that changed nothing: double `interval`, and
    at least `priced_interval(ratio)`."""
    return min(MAX_EXPLORE_EVERY, max(2 * interval, priced_interval(ratio)))


@dataclass
class SpeculativeStep:
    """What one step did, as the adaptive rule measures it (filled in by the engine)."""

    num_decodes: int
    """Decoding sequences in the step (with drafts or not)."""
    num_tokens: int
    """Decode tokens the step computed: one per decoding sequence plus the drafts."""
    num_draft_tokens: int
    num_prefill_tokens: int = 0
    """Tokens of prompt chunks and recomputes: everything else the step computed."""
    num_accepted_tokens: int = 0
    """Drafts the verification kept (known after the step)."""
    seconds: float = 0.0
    """The step's wall time (known after the step)."""
    catch_up_seconds: float = 0.0
    """Of `seconds`, the draft model's catch-up on tokens it skipped while speculation was
    off (known after the step; see draft_model.py)."""


class AdaptiveSpeculation:
    """Per step: how many drafts each sequence may have (0 = a plain step); learns from the
    steps it is told about (`record`). Not adaptive: always `num_speculative_tokens`."""

    def __init__(self, num_speculative_tokens: int, adaptive: bool = True):
        self.num_speculative_tokens = num_speculative_tokens
        self.adaptive = adaptive
        self.plain = LineFit()
        self.speculative = LineFit()
        self._proposed = self._accepted = 0.0  # decayed sums over speculative steps
        self._decodes = 0.0
        self.num_decisions = 0
        self.speculating = True
        """The last decision."""
        self.exploring = False
        """The last decision ran the mode the rule did not pick."""
        self.num_explorations = 0
        self.explore_interval = EXPLORE_EVERY
        """Steps between the latest exploration and the next (module doc)."""
        self._next_explore = EXPLORE_EVERY
        self._pick: bool | None = None  # the rule's latest pick
        self._ratio = 1.0  # its predicted speedup, when exploring
        self._retries = 0

    @property
    def acceptance_rate(self) -> float:
        return self._accepted / self._proposed if self._proposed else 0.0

    @property
    def drafts_per_seq(self) -> float:
        return self._proposed / self._decodes if self._decodes else 0.0

    def num_draft_tokens(self, batch_size: int) -> int:
        """Decide this step (call once per step, before scheduling it)."""
        self.speculating = self._decide(batch_size)
        return self.num_speculative_tokens if self.speculating else 0

    def _decide(self, batch_size: int) -> bool:
        self.exploring = False
        if not self.adaptive:
            return True
        self.num_decisions += 1
        if self.speculative.count < MIN_POINTS:
            return True
        if self.plain.count < MIN_POINTS:
            return False
        ratio = speedup(
            max(1, batch_size),
            self.acceptance_rate,
            self.drafts_per_seq,
            self.plain,
            self.speculative,
        )
        pays = ratio > 1.0 + MARGIN
        if pays != self._pick:  # first pick, or the batch or the yield changed it
            self._pick = pays
            self.explore_interval = max(EXPLORE_EVERY, priced_interval(ratio))
            self._next_explore = self.num_decisions + self.explore_interval
        elif self.num_decisions >= self._next_explore:
            self.exploring = True
            self._ratio = ratio
            return not pays
        return pays

    def _explored(self, measured: bool) -> None:
        """Schedule the next exploration after this one: if it changes nothing, after a
        longer interval (if the pick flips, `_decide` starts the intervals over); one whose
        step was not measured (it prefilled) is tried again next step, EXPLORE_RETRIES times."""
        if not measured and self._retries < EXPLORE_RETRIES:
            self._retries += 1
            return
        self._retries = 0
        self.num_explorations += 1
        self.explore_interval = exploration_interval(self.explore_interval, self._ratio)
        self._next_explore = self.num_decisions + self.explore_interval

    def record(self, step: SpeculativeStep) -> None:
        """Feed a step that decoded and prefilled nothing (others are ignored) to the line
        of its mode (a step whose sequences had no drafts ran the plain path), and its
        yield to the acceptance estimates; a draft model's catch-up is left out of its time
        (module doc)."""
        measured = step.num_decodes > 0 and not step.num_prefill_tokens
        if self.exploring:
            self._explored(measured)
        if not measured:
            return
        if step.num_draft_tokens == 0:
            self.plain.add(step.num_tokens, step.seconds)
        else:
            self.speculative.add(step.num_tokens, step.seconds - step.catch_up_seconds)
        if self.speculating:  # drafts were asked for: how many came, how many held
            self._proposed = self._proposed * DECAY + step.num_draft_tokens
            self._accepted = self._accepted * DECAY + step.num_accepted_tokens
            self._decodes = self._decodes * DECAY + step.num_decodes
