"""SLO-aware dynamic PD disaggregation (report §3.2): where each half goes, and role flips.

Two pure functions over a `ClusterSnapshot`, so the live scheduler and the simulator run
the same code:

* `slo_pd(request, snapshot)`, the placement policy. Prefill half: the prefill instance
  with the lowest predicted TTFT, if that meets the request's TTFT target; else the best
  instance of the "D→P pool" (prefill by role but still finishing the decodes it had, or
  ordered to flip and not confirmed yet) if that meets it; else the lowest prediction
  overall. Decode half: the least-loaded decode instance, among those whose recent TPOT is
  within target when there are any. Colocated requests: least load.
* `plan_role_flips(snapshot, config)`, the instance scheduler. Decode → prefill when even
  the best prefill instance would miss the TTFT target for a typical prompt (and more than
  `min_decode_instances` decode instances remain): the least-loaded decode instance flips.
  Prefill → decode when a decode instance's TPOT is over target, or a prefill instance has
  been idle for `idle_seconds` (and more than `min_prefill_instances` remain): an instance
  with nothing queued flips, if the prefill instances left meet the TTFT target without
  it; those that started as decode go first (back to their pool).

The TTFT predictor is the report's: the queueing delay on the instance (the prefill tokens
queued there) plus the prefill time of this prompt's uncached tokens, at a time per token
measured online: the instance's own recent prefill time per token from its heartbeats, or,
for an instance that has not prefilled lately (one just flipped), the pool's mean (the
instances run the same model on the same hardware), plus a fixed overhead for the hops and
the KV transfer.

Hysteresis, so roles do not flap with each heartbeat: an instance keeps a role for at least
`cooldown` seconds after taking it; "idle" means no prefill queued for `idle_seconds` in a row;
at most one flip per model per plan; none back to decode while the TTFT target is at risk, nor
when the prefill instances that would remain would put it at risk.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest

PD_ROLES = ("prefill", "decode")
DEFAULT_SECONDS_PER_TOKEN = 1e-4
"""Prefill time per token before any instance has prefilled `MIN_FIT_TOKENS` tokens."""
MIN_FIT_TOKENS = 256
DEFAULT_OVERHEAD = 0.02
"""Seconds a first token spends outside prefill compute: NATS hops, KV reservation."""


@dataclass(frozen=True, slots=True)
class TtftPredictor:
    seconds_per_token: float = DEFAULT_SECONDS_PER_TOKEN
    """The pool's time per prefill token, for instances without a recent measurement."""
    overhead: float = DEFAULT_OVERHEAD
    """Seconds added to every prediction."""

    @classmethod
    def fit(cls, views: Iterable[InstanceView], overhead: float = DEFAULT_OVERHEAD):
        """The pool's time per prefill token: the mean of `views`' recent measurements, else
        their lifetime counters' ratio, else the default."""
        views = list(views)
        recent = [
            v.heartbeat.steps.recent_prefill_seconds_per_token
            for v in views
            if v.heartbeat.steps.recent_prefill_seconds_per_token > 0
        ]
        if recent:
            return cls(sum(recent) / len(recent), overhead)
        tokens = sum(v.heartbeat.steps.prefill_tokens for v in views)
        seconds = sum(v.heartbeat.steps.prefill_seconds for v in views)
        if tokens < MIN_FIT_TOKENS or seconds <= 0:
            return cls(DEFAULT_SECONDS_PER_TOKEN, overhead)
        return cls(seconds / tokens, overhead)

    def seconds_per_token_of(self, view: InstanceView) -> float:
        return view.heartbeat.steps.recent_prefill_seconds_per_token or self.seconds_per_token

    @staticmethod
    def queued_tokens(view: InstanceView) -> int:
        """Prefill tokens ahead of a new online prompt: the heartbeat's backlog plus what
        the scheduler placed there since, less offline work (the engine prefills online
        prompts first)."""
        load = view.heartbeat.load
        backlog = load.num_prefill_backlog_tokens - load.num_offline_prefill_backlog_tokens
        return backlog + view.pending_tokens - view.pending_offline_tokens

    def predict(self, view: InstanceView, num_new_tokens: int) -> float:
        """Seconds to the first token of a prompt needing `num_new_tokens` prefilled there."""
        num_tokens = self.queued_tokens(view) + num_new_tokens
        return num_tokens * self.seconds_per_token_of(view) + self.overhead


def slo_pd(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    if request.roles == ("prefill",):
        return _place_prefill(request, snapshot)
    candidates = snapshot.candidates(request.model, request.roles)
    if request.roles == ("decode",) and request.slo_tpot is not None:
        within = [v for v in candidates if not tpot_over(v, request.slo_tpot)]
        candidates = within or candidates
    return least_loaded(candidates)


def _place_prefill(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    candidates = snapshot.candidates(request.model, ("prefill",))
    if not candidates:
        return None
    predictor = TtftPredictor.fit(snapshot.candidates(request.model, PD_ROLES))
    predicted = {
        v.instance_id: predictor.predict(v, request.uncached_tokens(v.instance_id))
        for v in candidates
    }

    def best(views: Sequence[InstanceView]) -> str:
        return min(views, key=lambda v: (predicted[v.instance_id], v.instance_id)).instance_id

    settled = [v for v in candidates if not is_flipping_to_prefill(v)]
    flipping = [v for v in candidates if is_flipping_to_prefill(v)]
    for pool in (settled, flipping):
        if pool and (request.slo_ttft is None or predicted[best(pool)] <= request.slo_ttft):
            return best(pool)
    return best(candidates)


def is_flipping_to_prefill(view: InstanceView) -> bool:
    """In the D→P pool: ordered to prefill but not confirmed, or still decoding."""
    return view.pending_role == "prefill" or view.heartbeat.load.num_decoding > 0


def tpot_over(view: InstanceView, slo_tpot: float) -> bool:
    """Decoding now, at more than `slo_tpot` seconds per output token."""
    hb = view.heartbeat
    return hb.load.num_decoding > 0 and hb.steps.recent_tpot > slo_tpot


def least_loaded(candidates: Sequence[InstanceView]) -> str | None:
    if not candidates:
        return None
    return min(candidates, key=lambda v: (v.load, v.num_requests, v.instance_id)).instance_id


# -- role flips ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlipConfig:
    slo_ttft: float | None = None
    """TTFT target (seconds); None = never flip decode → prefill for TTFT."""
    slo_tpot: float | None = None
    """TPOT target (seconds); None = never flip prefill → decode for TPOT."""
    min_decode_instances: int = 1
    """Decode instances that always stay decode."""
    min_prefill_instances: int = 1
    """Prefill instances that always stay prefill."""
    cooldown: float = 3.0
    """Seconds an instance keeps a role after taking it before it may flip again."""
    idle_seconds: float = 30.0
    """Seconds without queued prefill after which a prefill instance counts as idle."""
    admission_margin: float | None = None
    """SLO admission: refuse online requests predicted past this × slo_ttft (None = off)."""


def plan_role_flips(snapshot: ClusterSnapshot, config: FlipConfig) -> list[tuple[str, str]]:
    """Role changes to order now, as (instance id, new role); at most one per model."""
    flips = []
    for model in sorted({v.heartbeat.model for v in snapshot.instances}):
        flip = _plan_model(snapshot.candidates(model, PD_ROLES), snapshot.now, config)
        if flip is not None:
            flips.append(flip)
    return flips


def _plan_model(pool: list[InstanceView], now: float, config: FlipConfig) -> tuple[str, str] | None:
    prefill = [v for v in pool if v.role == "prefill"]
    decode = [v for v in pool if v.role == "decode"]
    if not prefill or not decode:
        return None  # colocated, or a pool that is not ours to rebalance

    def cooled(v: InstanceView) -> bool:
        return v.pending_role is None and now - v.role_since >= config.cooldown

    predictor, typical = TtftPredictor.fit(pool), typical_prompt(pool)
    if ttft_at_risk(prefill, predictor, typical, config.slo_ttft):
        if len(decode) <= config.min_decode_instances:
            return None
        movable = [v for v in decode if cooled(v)]
        if not movable:
            return None
        # Prefill instances lent to decode first (report: "from the P→D pool"), then the
        # one with the fewest tokens to finish.
        pick = min(movable, key=lambda v: (v.started_as != "prefill", v.load, v.instance_id))
        return pick.instance_id, "prefill"
    if len(prefill) <= config.min_prefill_instances:
        return None
    slow_decode = config.slo_tpot is not None and any(tpot_over(v, config.slo_tpot) for v in decode)
    idle_for = config.idle_seconds if not slow_decode else 0.0
    # Decode instances lent to prefill go home first (report: "from the D→P pool"): while
    # one is away, no other prefill instance is a candidate.
    away = [v for v in prefill if v.started_as == "decode"]
    movable = [
        v
        for v in away or prefill
        if cooled(v)
        and _idle(v, now, idle_for)
        # The rest must meet the target without it: an instance that drained while
        # another still has a queue stays (else it would flip back at once).
        and not ttft_at_risk(
            [u for u in prefill if u is not v], predictor, typical, config.slo_ttft
        )
    ]
    if not movable:
        return None
    pick = min(movable, key=lambda v: (v.load, v.instance_id))
    return pick.instance_id, "decode"


def ttft_at_risk(
    prefill: Sequence[InstanceView],
    predictor: TtftPredictor,
    num_prompt_tokens: int,
    slo_ttft: float | None,
) -> bool:
    """Even the best prefill instance would miss `slo_ttft` for a prompt of that size."""
    if slo_ttft is None or not prefill:
        return False
    return min(predictor.predict(v, num_prompt_tokens) for v in prefill) > slo_ttft


def typical_prompt(pool: Sequence[InstanceView]) -> int:
    """Mean prefill tokens per first token over the pool's lifetime (0 before any)."""
    count = sum(v.heartbeat.steps.ttft_count for v in pool)
    return sum(v.heartbeat.steps.prefill_tokens for v in pool) // count if count else 0


def _idle(view: InstanceView, now: float, seconds: float) -> bool:
    """Nothing queued (nor placed since its heartbeat) for at least `seconds`."""
    return (
        view.idle_since is not None
        and view.pending_requests == 0
        and now - view.idle_since >= seconds
    )
