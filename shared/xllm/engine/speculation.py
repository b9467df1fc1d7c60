"""Speculation: which sequences may speculate, and whether speculating pays this step.

A speculative step verifies each decoding sequence's drafts in the same forward pass as
its last token: 1 + k rows instead of 1, through the multi-token paged attention instead of
the one-row decode one (and, with a draft model, the draft's passes). It pays when the
accepted drafts outweigh that extra cost — at batch 1 on a memory-bound model, k + 1 rows cost about what 1 row does; at a
large batch the step is compute-bound and the rejected rows are pure loss (llama.cpp's
lookup decoding loses from 4 slots on). So the engine decides per step, from measurements:

  * tokens/s at this batch size, measured: of the steps the switch ran speculating (tokens
    produced: one per sequence plus the drafts kept, over the step's time) and of those it
    ran plain, exponentially weighted per batch size (`BatchRates`, ~10 steps matter). So
    the switch picks what it measured faster, whatever made a mode slow: a verify dearer
    than its token count says (each verifying sequence's own attention pass), the
    proposer's time, steps that found no draft yet paid for looking;
  * where a batch size lacks MIN_POINTS such steps of a mode, that mode's tokens/s is
    predicted instead, from two least-squares lines of step seconds against tokens in the
    step, one over the steps the switch ran plain (`plain`, x = batch size) and one over
    the speculating steps that verified drafts (`speculative`, x = batch size + drafts;
    a speculating step without any is in neither line: it paid for the proposer), and the
    yield: the acceptance rate a (accepted / proposed drafts) and the drafts per decoding
    sequence q (sequences without a match count 0) over recent speculating steps:

    tokens/s on  = B (1 + a q) / speculative(B (1 + q))
    tokens/s off = B / plain(B)

The rule, at batch size B: turn speculation on iff on > (1 + MARGIN) x off, and back off
once on < off (near a tie the mode stays what it is: no flapping on noise).

Until each mode has MIN_POINTS measured steps, the missing one is run (speculative first);
then the mode the rule did not pick runs now and then (an exploration step), so the rates
and the acceptance rate stay current as the batch and the requests change. Exploring is
priced: the worse mode's step loses `loss = max(r, 1/r) - 1` of a step (r = on / off), and
turning a draft model back on first costs its catch-up (its prefill of every token computed
while it was off, at most the live context: `switch_on_steps`, priced by the draft's
measured seconds per prefilled token), so speculation is explored only once `(loss +
catch-up) / EXPLORE_BUDGET` steps have passed since it last ran (its expected cost stays
under EXPLORE_BUDGET of the time); besides, the intervals start at EXPLORE_EVERY, and each
exploration that leaves the rule's pick unchanged doubles the interval (up to
MAX_EXPLORE_EVERY): with acceptance near 0, speculation is tried ever more rarely, and a
draft whose catch-up alone would exceed the budget is not tried until the contexts it would
recompute end. When the pick flips (the batch or the yield changed), the intervals start
over from the least. An exploration whose step could not be measured (it prefilled, see
below) runs again on the next step, a few times at most.

Only steps that decode and prefill nothing are measured: a prefill chunk's cost says nothing
about decoding. A draft model's catch-up (draft_model.py) is a one-off cost of switching,
not of speculating: it is left out of that step's time, and priced in the exploration
instead. When the rule says no, the step is the plain path unchanged: the proposer is not
called, and the draft model computes nothing (not even the KV of new prompt chunks).

Eligibility (`can_speculate`): requests with penalties, pending min_tokens, logprobs,
n > 1 or a grammar (`SamplingParams.allows_speculation`) never speculate (see
rejection_sampler.py), nor do prefill-only ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
RATE_DECAY = 0.9
"""The same for the measured tokens/s of a mode at one batch size (~10 steps matter: an
exploration's step moves it a tenth of the way, a few can flip the pick)."""


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


@dataclass
class BatchRates:
    """Exponentially weighted tokens produced and seconds taken by measured steps, per
    batch size (the module doc's measured tokens/s of one mode)."""

    tokens: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def add(self, batch_size: int, tokens: float, seconds: float) -> None:
        self.tokens[batch_size] = self.tokens.get(batch_size, 0.0) * RATE_DECAY + tokens
        self.seconds[batch_size] = self.seconds.get(batch_size, 0.0) * RATE_DECAY + seconds
        self.counts[batch_size] = self.counts.get(batch_size, 0) + 1

    @property
    def num_steps(self) -> int:
        return sum(self.counts.values())

    def tokens_per_second(self, batch_size: int) -> float | None:
        """None until MIN_POINTS steps of this batch size were measured."""
        if self.counts.get(batch_size, 0) < MIN_POINTS or self.seconds[batch_size] <= 0.0:
            return None
        return self.tokens[batch_size] / self.seconds[batch_size]


def speedup(
    batch_size: int,
    acceptance_rate: float,
    drafts_per_seq: float,
    plain: LineFit,
    speculative: LineFit,
    measured_on: float | None = None,
    measured_off: float | None = None,
) -> float:
    """Expected tokens per second with drafts over without (the module doc's on / off):
    each side measured at this batch size where given, else predicted by the lines."""
    on, off = measured_on, measured_off
    if on is None:
        time_on = speculative.predict(batch_size * (1.0 + drafts_per_seq))
        on = batch_size * (1.0 + acceptance_rate * drafts_per_seq) / time_on if time_on > 0 else 0
    if off is None:
        time_off = plain.predict(batch_size)
        off = batch_size / time_off if time_off > 0 else 0
    if on <= 0.0 or off <= 0.0:
        return 1.0
    return on / off


def speculation_pays(
    batch_size: int,
    acceptance_rate: float,
    drafts_per_seq: float,
    plain: LineFit,
    speculative: LineFit,
    margin: float = MARGIN,
) -> bool:
    """Whether turning speculation on pays (the module doc's rule), by the lines alone."""
    ratio = speedup(batch_size, acceptance_rate, drafts_per_seq, plain, speculative)
    return ratio > 1.0 + margin


def switch_on_steps(
    seconds_per_token: float, tokens_off: int, context_tokens: int, step_seconds: float
) -> float:
    """A draft model's catch-up when speculation turns back on, in plain steps: its prefill
    of the tokens computed while it was off (at most the live context)."""
    if step_seconds <= 0.0:
        return 0.0
    return seconds_per_token * min(tokens_off, context_tokens) / step_seconds


def priced_interval(ratio: float, switch_steps: float = 0.0) -> int:
    """The fewest steps between explorations for the worse mode's step (`ratio` = on / off
    speed), and the `switch_steps` that turning to it costs first, to be expected to lose
    no more than EXPLORE_BUDGET of the time. (The cap bounds the step's loss, not the
    switch's: a switch dearer than the budget allows is not made.)"""
    loss = max(ratio, 1.0 / ratio) - 1.0 if ratio > 0.0 else float("inf")
    return int(min(MAX_EXPLORE_EVERY, loss / EXPLORE_BUDGET) + switch_steps / EXPLORE_BUDGET)


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
    draft_prefill_seconds: float = 0.0
    """Of `seconds`, the draft model's prefill passes (catch-up, mirror of prompt chunks)."""
    draft_prefill_tokens: int = 0
    """The tokens those passes computed."""
    context_tokens: int = 0
    """Tokens of the step's sequences (what a draft's catch-up recomputes at most)."""


class AdaptiveSpeculation:
    """Per step: how many drafts each sequence may have (0 = a plain step); learns from the
    steps it is told about (`record`). Not adaptive: always `num_speculative_tokens`."""

    def __init__(self, num_speculative_tokens: int, adaptive: bool = True):
        self.num_speculative_tokens = num_speculative_tokens
        self.adaptive = adaptive
        self.plain = LineFit()
        self.speculative = LineFit()
        self.on_rates = BatchRates()
        """Measured tokens/s of the steps the switch ran speculating, per batch size."""
        self.off_rates = BatchRates()
        """The same for the steps it ran plain."""
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
        self._last_on = 0  # the decision that last speculated
        self._tokens_off = 0  # tokens computed since: what a draft would catch up on
        self._context_tokens = 0  # of the latest step's sequences
        self._prefill_seconds = self._prefill_tokens = 0.0  # decayed: a draft's prefills

    @property
    def acceptance_rate(self) -> float:
        return self._accepted / self._proposed if self._proposed else 0.0

    @property
    def drafts_per_seq(self) -> float:
        return self._proposed / self._decodes if self._decodes else 0.0

    @property
    def draft_seconds_per_token(self) -> float:
        """A draft model's measured prefill time per token (0 without a draft model)."""
        return self._prefill_seconds / self._prefill_tokens if self._prefill_tokens else 0.0

    def num_draft_tokens(self, batch_size: int) -> int:
        """Decide this step (call once per step, before scheduling it)."""
        self.speculating = self._decide(batch_size)
        if self.speculating:
            self._last_on = self.num_decisions
        return self.num_speculative_tokens if self.speculating else 0

    def expected_speedup(self, batch_size: int) -> float:
        """Tokens/s speculating over plain at `batch_size` (module doc)."""
        return speedup(
            batch_size,
            self.acceptance_rate,
            self.drafts_per_seq,
            self.plain,
            self.speculative,
            self.on_rates.tokens_per_second(batch_size),
            self.off_rates.tokens_per_second(batch_size),
        )

    def _decide(self, batch_size: int) -> bool:
        self.exploring = False
        if not self.adaptive:
            return True
        self.num_decisions += 1
        if self.on_rates.num_steps < MIN_POINTS:
            return True
        if self.off_rates.num_steps < MIN_POINTS:
            return False
        batch_size = max(1, batch_size)
        ratio = self.expected_speedup(batch_size)
        pays = ratio > (1.0 if self._pick else 1.0 + MARGIN)  # (on: until it loses)
        if pays != self._pick:  # first pick, or the batch or the yield changed it
            self._pick = pays
            self.explore_interval = max(EXPLORE_EVERY, priced_interval(ratio))
            self._next_explore = self.num_decisions + self.explore_interval
        elif self.num_decisions >= self._next_explore and (
            self._retries or self._affordable(batch_size, ratio)  # (a retry is paid for)
        ):
            self.exploring = True
            self._ratio = ratio
            return not pays
        return pays

    def _affordable(self, batch_size: int, ratio: float) -> bool:
        """Whether exploring now keeps within EXPLORE_BUDGET: turning speculation on pays a
        draft model's catch-up too, so it waits until enough steps have passed since
        speculation last ran (module doc)."""
        if self._pick:  # exploring the plain path: nothing to catch up on
            return True
        switch = switch_on_steps(
            self.draft_seconds_per_token,
            self._tokens_off,
            self._context_tokens,
            self.plain.predict(batch_size),
        )
        return self.num_decisions - self._last_on >= priced_interval(ratio, switch)

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
        """Feed a step that decoded and prefilled nothing (others are ignored) to the rates of
        the mode the switch ran, to the line of the path it took (a step whose sequences had
        no drafts ran the plain path), and its yield to the acceptance estimates; a draft
        model's catch-up is left out of its time (module doc). Any step counts toward what a
        draft would catch up on, and its draft prefills toward the price of that."""
        self._track_catch_up(step)
        measured = step.num_decodes > 0 and not step.num_prefill_tokens
        if self.exploring:
            self._explored(measured)
        if not measured:
            return
        seconds = step.seconds - step.catch_up_seconds
        rates = self.on_rates if self.speculating else self.off_rates
        rates.add(step.num_decodes, step.num_decodes + step.num_accepted_tokens, seconds)
        if not self.speculating:
            self.plain.add(step.num_tokens, seconds)
        elif step.num_draft_tokens:  # (one with none paid for the proposer: in neither line)
            self.speculative.add(step.num_tokens, seconds)
        if self.speculating:  # drafts were asked for: how many came, how many held
            self._proposed = self._proposed * DECAY + step.num_draft_tokens
            self._accepted = self._accepted * DECAY + step.num_accepted_tokens
            self._decodes = self._decodes * DECAY + step.num_decodes

    def _track_catch_up(self, step: SpeculativeStep) -> None:
        self._context_tokens = step.context_tokens
        if self.speculating:
            self._tokens_off = 0
        else:
            self._tokens_off += step.num_tokens + step.num_prefill_tokens
        if step.draft_prefill_tokens:
            self._prefill_seconds = self._prefill_seconds * DECAY + step.draft_prefill_seconds
            self._prefill_tokens = self._prefill_tokens * DECAY + step.draft_prefill_tokens
