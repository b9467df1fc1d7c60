"""SLO-aware dynamic PD disaggregation (report §3.2): where each half goes, and role flips.

Two pure functions over a `ClusterSnapshot`, so the live scheduler and the simulator run
the same code (before them, `spare_capacity` runs a request whole where no miss is predicted):

* `slo_pd(request, snapshot)`, the placement policy, and with the cost model `placement`
  holds, `prefill_instance` and `decode_instance`. Prefill half: the prefill instance with
  the lowest predicted TTFT, if that meets the target; else the best of the "D→P pool"
  (decode instances lent to prefill and still finishing their decodes, or ordered to flip
  and not confirmed yet) if that meets it; else the lowest prediction. Past the risk line
  (`FLIP_RISK_SHARE`), a decode instance that can run the whole request in place within
  the limits of `decode_limits` (a hybrid host) takes it if it predicts a lower TTFT.
  Decode half: the decode instance with the fewest running tokens within the limits; else
  the prefill instance itself if it stays within them beside a full prefill chunk (hybrid,
  no KV transfer); else the decode instance with the fewest. Colocated: least load.
* `plan_role_flips(snapshot, config, cost)`, the instance scheduler, driven by predicted
  misses both ways. Decode → prefill past the risk line for a typical prompt (while more
  than `min_decode_instances`, by default the report's two, remain): the decode instance
  with the fewest tokens, those lent from prefill first. Prefill → decode when the decode
  pool is predicted to miss TPOT (`decode_at_risk`), or, without a cost model (so no
  hybrid decodes), a prefill instance has been idle for the hysteresis: one with nothing
  queued whose absence keeps the rest clear of the risk line; those that started as
  decode first (back to their pool).

The TTFT predictor is the report's: the queueing delay on the instance (the prefill tokens
queued there) plus the prefill time of this prompt's uncached tokens, at a time per token
measured online: the instance's own recent prefill time per token from its heartbeats, or,
for an instance that has not prefilled lately (one just flipped), the pool's mean (the
instances run the same model on the same hardware), plus a fixed overhead for the hops and
the KV transfer.

Hysteresis, so roles do not flap with each heartbeat, in units of the predicted service
time (a typical prompt's prefill at the pool's measured time per token: `service_time`), so
it scales with the model, the hardware and the prompts instead of fixed seconds: an instance
keeps a role for at least `hysteresis` service times after taking it (and `cooldown`
seconds); "idle" means no prefill queued for as long in a row (and `idle_seconds`); at most
one flip per model per plan; none back to decode while the TTFT target is at risk, nor when
the prefill instances that would remain would cross the risk line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from services.scheduler.cluster import ClusterSnapshot, InstanceView
from services.scheduler.policies.base import PlacementRequest
from services.scheduler.policies.decode_limits import DecodeCost, within_limits

PD_ROLES = ("prefill", "decode")
DEFAULT_SECONDS_PER_TOKEN = 1e-4
"""Prefill time per token before any instance has prefilled `MIN_FIT_TOKENS` tokens."""
MIN_FIT_TOKENS = 256
DEFAULT_OVERHEAD = 0.02
"""Seconds a first token spends outside prefill compute: NATS hops, KV reservation."""
FLIP_RISK_SHARE = 0.5
"""Share of the queueing a TTFT target allows (the target less the prompt's own prefill)
past which the prefill pool counts as at risk (a decode instance flips to prefill, or runs
a request in place): half of it used means the queue has room for one more such wave, no
more. SLO admission refuses what would wait past the target, so queues never predict much
beyond it, and a flip ordered only then comes too late. Chosen by the sweep in
benchmarks/README.md ("SLO-aware PD on every mix"): 0.5 and 0.75 within 0.5% of each
other in goodput on the Azure code trace at 16 A100s and BurstGPT at 3, 1.0 1-3% lower (at
16 it flips once, and stays at 9P:7D)."""


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
        prompts first) and the outputs placed there (decoded, not prefilled)."""
        load = view.heartbeat.load
        backlog = load.num_prefill_backlog_tokens - load.num_offline_prefill_backlog_tokens
        pending = view.pending_tokens - view.pending_offline_tokens - view.pending_output_tokens
        return backlog + max(pending, 0)

    def predict(self, view: InstanceView, num_new_tokens: int) -> float:
        """Seconds to the first token of a prompt needing `num_new_tokens` prefilled there."""
        num_tokens = self.queued_tokens(view) + num_new_tokens
        return num_tokens * self.seconds_per_token_of(view) + self.overhead


def slo_pd(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    if request.roles == ("prefill",):
        return _place_prefill(request, snapshot)
    if request.roles == ("decode",):
        return _decode_pool_choice(request, snapshot, None)
    return least_loaded(snapshot.candidates(request.model, request.roles))


def decode_instance(
    request: PlacementRequest, snapshot: ClusterSnapshot, prefill_id: str, cost: DecodeCost | None
) -> str | None:
    """Where the decode half of `request`, prefilled on `prefill_id`, goes. A decode instance
    chosen to prefill the whole request (`prefill_instance`) keeps it. Otherwise the decode
    instance with the fewest running tokens within the limits; if none is, the prefill
    instance itself (hybrid, no KV transfer) when its decode there stays within the limits
    beside a full prefill chunk in every step (so TPOT holds whatever prompts arrive); else
    the decode pool's least-loaded (no decode instance at all: the prefill instance).

    The report tries the prefill instance first. In the simulator that order loses: a
    prefill instance decoding beside 2,048-token chunks gives a TPOT within target but
    several times a decode instance's, and its decodes hold batch places and steps that
    queued prompts wait for, while the decode instances idle (benchmarks/README.md,
    "SLO-aware PD on every mix"). So the hybrid role takes what the decode pool cannot."""
    if snapshot.view(prefill_id).role == "decode":
        return prefill_id
    within = _decode_pool_choice(request, snapshot, cost, strict=True)
    if within is not None:
        return within
    if within_limits(snapshot.view(prefill_id), request, cost, prefills=True):
        return prefill_id
    return _decode_pool_choice(request, snapshot, cost) or prefill_id


def _decode_pool_choice(
    request: PlacementRequest,
    snapshot: ClusterSnapshot,
    cost: DecodeCost | None,
    strict: bool = False,
) -> str | None:
    """The decode instance with the fewest running tokens among those within the limits
    (without a cost model: the memory limit and a measured TPOT within target); if none
    is, the one with the fewest running tokens (`strict`: None)."""
    candidates = snapshot.candidates(request.model, ("decode",))

    def fits(v: InstanceView) -> bool:
        if not within_limits(v, request, cost):
            return False
        return cost is not None or request.slo_tpot is None or not tpot_over(v, request.slo_tpot)

    pool = [v for v in candidates if fits(v)] or ([] if strict else candidates)
    if not pool:
        return None
    return min(pool, key=lambda v: (running_tokens(v), v.num_requests, v.instance_id)).instance_id


def running_tokens(view: InstanceView) -> int:
    """Tokens the instance holds or will: queued or running, placed since its heartbeat,
    and reserved for prompts prefilled elsewhere."""
    return view.load + view.heartbeat.load.num_reserved_tokens


def _place_prefill(request: PlacementRequest, snapshot: ClusterSnapshot) -> str | None:
    choice = _prefill_choice(request, snapshot)
    return None if choice is None else choice[0]


def _prefill_choice(
    request: PlacementRequest, snapshot: ClusterSnapshot
) -> tuple[str, float, TtftPredictor] | None:
    """(instance, its predicted TTFT, the predictor) for the prefill half."""
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
            return best(pool), predicted[best(pool)], predictor
    pick = best(candidates)
    return pick, predicted[pick], predictor


def prefill_instance(
    request: PlacementRequest, snapshot: ClusterSnapshot, cost: DecodeCost | None
) -> str | None:
    """The prefill half with the cost model: the prefill pools' choice (`slo_pd`) when it
    meets the TTFT target; else, before waiting for a flip, a decode instance that can run
    the whole request in place (hybrid) with its decodes, this one's included, within the
    limits beside a full prefill chunk, and meeting the target; else the pools' choice."""
    choice = _prefill_choice(request, snapshot)
    if choice is None:
        return None
    pick, predicted, predictor = choice
    spt = predictor.seconds_per_token_of(snapshot.view(pick))
    alone = request.uncached_tokens(pick) * spt + predictor.overhead
    if request.slo_ttft is None or predicted <= risk_line(request.slo_ttft, alone):
        return pick
    hosts = hybrid_hosts(request, snapshot, cost)
    ttft = {
        v.instance_id: predictor.predict(v, request.uncached_tokens(v.instance_id)) for v in hosts
    }
    best = min(hosts, key=lambda v: (ttft[v.instance_id], v.instance_id), default=None)
    if best is None or ttft[best.instance_id] >= predicted:
        return pick
    return best.instance_id


def hybrid_hosts(
    request: PlacementRequest, snapshot: ClusterSnapshot, cost: DecodeCost | None
) -> list[InstanceView]:
    """Decode instances that may run all of `request` in place: not leaving the role, and
    their decodes, this one's included, within the limits beside a full prefill chunk."""
    return [
        v
        for v in snapshot.candidates(request.model, ("decode",))
        if v.pending_role is None and within_limits(v, request, cost, prefills=True)
    ]


def is_flipping_to_prefill(view: InstanceView) -> bool:
    """In the D→P pool: ordered to prefill but not confirmed, or a decode instance lent to
    prefill and still finishing its decodes (a prefill instance's own hybrid decodes do not
    count)."""
    lent = view.started_as == "decode" and view.heartbeat.load.num_decoding > 0
    return view.pending_role == "prefill" or lent


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
    min_decode_instances: int = 2
    """Decode instances that always stay decode (the report keeps at least two)."""
    min_prefill_instances: int = 1
    """Prefill instances that always stay prefill."""
    cooldown: float = 3.0
    """Seconds an instance keeps a role after taking it before it may flip again (at least;
    see `hysteresis`)."""
    idle_seconds: float = 30.0
    """Seconds without queued prefill after which a prefill instance counts as idle (at
    least; see `hysteresis`)."""
    hysteresis: float = 0.0
    """Both of the above, in predicted service times (`service_time`): the larger counts."""
    admission_margin: float | None = None
    """SLO admission: refuse online requests predicted past this × slo_ttft (None = off)."""


def plan_role_flips(
    snapshot: ClusterSnapshot, config: FlipConfig, cost: DecodeCost | None = None
) -> list[tuple[str, str]]:
    """Role changes to order now, as (instance id, new role); at most one per model. `cost`
    predicts the decode pool's TPOT (None: only measured TPOT counts)."""
    flips = []
    for model in sorted({v.heartbeat.model for v in snapshot.instances}):
        flip = _plan_model(snapshot.candidates(model, PD_ROLES), snapshot.now, config, cost)
        if flip is not None:
            flips.append(flip)
    return flips


def _plan_model(
    pool: list[InstanceView], now: float, config: FlipConfig, cost: DecodeCost | None
) -> tuple[str, str] | None:
    prefill = [v for v in pool if v.role == "prefill"]
    decode = [v for v in pool if v.role == "decode"]
    if not prefill or not decode:
        return None  # colocated, or a pool that is not ours to rebalance
    predictor, typical = TtftPredictor.fit(pool), typical_prompt(pool)
    scaled = config.hysteresis * service_time(predictor, typical)
    cooldown = max(config.cooldown, scaled)

    def cooled(v: InstanceView) -> bool:
        return v.pending_role is None and now - v.role_since >= cooldown

    if ttft_at_risk(prefill, predictor, typical, config.slo_ttft, FLIP_RISK_SHARE):
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
    # An idle prefill instance decodes in place as well as a decode instance would (hybrid),
    # so it flips for idleness only where it cannot: without a cost model to predict with.
    if decode_at_risk(decode, typical, config.slo_tpot, cost):
        idle_for = 0.0
    elif cost is None:
        idle_for = max(config.idle_seconds, scaled)
    else:
        return None
    # Decode instances lent to prefill go home first (report: "from the D→P pool"): while
    # one is away, no other prefill instance is a candidate.
    away = [v for v in prefill if v.started_as == "decode"]
    movable = [
        v
        for v in away or prefill
        if cooled(v)
        and _idle(v, now, idle_for)
        # The rest must stay clear of the risk line without it (the line that flips an
        # instance to prefill): one that drained while another still has a queue stays,
        # else it would flip back at once.
        and not ttft_at_risk(
            [u for u in prefill if u is not v],
            predictor,
            typical,
            config.slo_ttft,
            FLIP_RISK_SHARE,
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
    share: float = 1.0,
) -> bool:
    """Even the best prefill instance would miss `slo_ttft` for a prompt of that size, or
    (`share` < 1) would use more than `share` of the waiting the target leaves it."""
    if slo_ttft is None or not prefill:
        return False
    line = risk_line(slo_ttft, service_time(predictor, num_prompt_tokens), share)
    return min(predictor.predict(v, num_prompt_tokens) for v in prefill) > line


def risk_line(slo_ttft: float, alone: float, share: float = FLIP_RISK_SHARE) -> float:
    """The predicted TTFT past which a prompt taking `alone` seconds on an idle instance
    counts as at risk: once its queueing uses `share` of the `slo_ttft - alone` it may."""
    return alone + share * max(slo_ttft - alone, 0.0)


def decode_at_risk(
    decode: Sequence[InstanceView], typical: int, slo_tpot: float | None, cost: DecodeCost | None
) -> bool:
    """The decode pool is predicted to miss `slo_tpot`: an instance measures its TPOT over
    it, or (with a cost model) none would take a typical prompt within its limits."""
    if slo_tpot is None:
        return False
    if any(tpot_over(v, slo_tpot) for v in decode):
        return True
    if cost is None or typical == 0:
        return False
    probe = PlacementRequest("typical", typical, 1, slo_tpot=slo_tpot)
    return not any(within_limits(v, probe, cost) for v in decode)


def service_time(predictor: TtftPredictor, typical: int) -> float:
    """Predicted seconds of a typical prompt's prefill on an idle instance: the unit of the
    flip hysteresis."""
    return typical * predictor.seconds_per_token + predictor.overhead


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
