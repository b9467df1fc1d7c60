"""The scheduler's decision, written once: `SchedulerService` and the simulator both call
these pure functions and differ only in how they carry the decision out.

    check(model, num_prompt_tokens, snapshot) -> Refusal | None   can any instance serve it
    place(request, snapshot, policy)          -> Placement | Refusal
    note(request, placement)                  -> Note             what the registry records

`place` runs `check`, then SLO admission (`policies.admission.refusal`), then asks the
policy for one colocated instance when the cluster has any, else once per half (roles
prefill, decode). Offline requests are placed by `policies.colocation` instead: colocated,
the most headroom; disaggregated, prefill in the latency-relaxed pool and decode in the
latency-strict pool only while the cost model predicts its TPOT target kept, else colocated
on the prefill instance (which then decodes it). The caller turns a `Placement` into commands (live: a `GenerateCmd` to
`instance_id`, or a `DecodeCmd` naming `prefill_instance_id`; simulated: the instances'
queues) and a `Refusal` into its reply, then records the `Note` in its `Registry` (so the
next placement, before the next heartbeat, sees this one's work) and, for policies reading
prefix hits, in its recent placements.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from services.scheduler.cluster import ClusterSnapshot
from services.scheduler.config import SchedulerConfig
from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import FlipConfig, PlacementRequest, Policy, colocation
from services.scheduler.policies.admission import refusal
from services.scheduler.policies.colocation import DecodeCost
from services.scheduler.policies.slo_pd import (
    decode_instance,
    hybrid_hosts,
    prefill_instance,
    slo_pd,
)
from services.scheduler.policies.spare_capacity import whole_request_instance
from xllm.hardware import load_profile
from xllm.hardware import tier_bandwidth as tier_bandwidth_of
from xllm.protocol import ErrorCode

ALL_ROLES = ("both", "prefill", "decode")


@dataclass(frozen=True, slots=True)
class Placement:
    instance_id: str
    """Where the request decodes and streams its output; it prefills there too unless
    `prefill_instance_id` is set."""
    prefill_instance_id: str | None = None
    """PD-disaggregated: where the prompt is prefilled (its KV then moves to `instance_id`);
    None = colocated on `instance_id`."""


@dataclass(frozen=True, slots=True)
class Refusal:
    code: ErrorCode
    message: str

    @property
    def shed(self) -> bool:
        """Refused by SLO admission (too much work), not for want of a fitting instance."""
        return self.code is ErrorCode.OVERLOADED


@dataclass(frozen=True, slots=True)
class Note:
    pending_tokens: tuple[tuple[str, int], ...]
    """(instance, tokens it will compute for the request) for each instance placed on, the
    prefill half first. Every one of them ends up holding the prompt's KV."""
    offline: bool = False
    """An offline request's work: online prompts do not wait behind it."""
    output_tokens: int = 0
    """Of the last entry's tokens (the decoding instance's), the outputs to generate: no
    prompt waits behind those for its prefill."""

    def outputs_on(self, instance_id: str) -> int:
        """Output tokens of this note's entry for `instance_id` (0 but the decoding one)."""
        return self.output_tokens if instance_id == self.pending_tokens[-1][0] else 0

    @property
    def holders(self) -> tuple[str, ...]:
        """The instances whose prefix cache will hold the prompt (prefix placements)."""
        return tuple(instance_id for instance_id, _ in self.pending_tokens)


def placement_request(
    *,
    request_id: str,
    num_prompt_tokens: int,
    max_tokens: int,
    model: str | None,
    priority: int,
    sequence_number: int,
    prefix_hits: dict[str, int],
    targets: FlipConfig,
    prefix_tiers: dict[str, dict[str, int]] | None = None,
    store_blocks: int = 0,
    tier_bandwidth: dict[str, float] | None = None,
) -> PlacementRequest:
    """What a policy sees of a request, with the SLO targets of `targets` (every policy gets
    them; slo-pd and SLO admission read them)."""
    return PlacementRequest(
        request_id=request_id,
        num_prompt_tokens=num_prompt_tokens,
        max_tokens=max_tokens,
        model=model,
        priority=priority,
        sequence_number=sequence_number,
        prefix_hits=prefix_hits,
        prefix_tiers=prefix_tiers or {},
        store_blocks=store_blocks,
        tier_bandwidth=tier_bandwidth or tier_bandwidth_of(None),
        slo_ttft=targets.slo_ttft,
        slo_tpot=targets.slo_tpot,
        admission_margin=targets.admission_margin,
    )


def decode_cost(config: SchedulerConfig) -> DecodeCost | None:
    """The cost model offline decode admission predicts with (None: not configured)."""
    if not config.cost_profile:
        return None
    return DecodeCost(load_model_config(config.cost_model), load_profile(config.cost_profile))


def check(model: str | None, num_prompt_tokens: int, snapshot: ClusterSnapshot) -> Refusal | None:
    """Why no instance could serve a prompt of `num_prompt_tokens` for `model` (None: some
    can). Cheap, so the live scheduler runs it before asking the kvstore for prefix hits."""
    candidates = snapshot.candidates(model, ALL_ROLES)
    if not candidates:
        what = f"model {model!r}" if model else "any model"
        return Refusal(ErrorCode.NO_INSTANCE, f"no live instance serves {what}")
    max_len = max(v.heartbeat.max_model_len for v in candidates)
    if num_prompt_tokens >= max_len:
        return Refusal(
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            f"the prompt has {num_prompt_tokens} tokens; the context is {max_len}",
        )
    return None


def place(
    request: PlacementRequest,
    snapshot: ClusterSnapshot,
    policy: Policy,
    cost: DecodeCost | None = None,
) -> Placement | Refusal:
    """Where `request` runs, or why it runs nowhere. Online requests go where `policy` says;
    offline ones (priority > 0) where `policies.colocation` says, `cost` predicting decode
    steps for its TPOT rule (None: offline decodes stay on their prefill instance)."""
    refused = check(request.model, request.num_prompt_tokens, snapshot)
    if refused is not None:
        return refused
    hosts = hybrid_hosts(request, snapshot, cost) if policy is slo_pd else ()
    overloaded = refusal(request, snapshot, hosts)
    if overloaded is not None:
        return Refusal(ErrorCode.OVERLOADED, overloaded)
    colocated = bool(snapshot.candidates(request.model, ("both",)))
    if request.priority > 0:
        placement = _offline(request, snapshot, cost, colocated)
    elif colocated:
        placement = _colocated(request, snapshot, policy)
    else:
        placement = _disaggregated(request, snapshot, policy, cost)
    if placement is None:
        return Refusal(ErrorCode.NO_INSTANCE, "no instance can serve this request")
    return placement


def _colocated(
    request: PlacementRequest, snapshot: ClusterSnapshot, policy: Policy
) -> Placement | None:
    instance_id = policy(request, snapshot)
    return None if instance_id is None else Placement(instance_id)


def _disaggregated(
    request: PlacementRequest, snapshot: ClusterSnapshot, policy: Policy, cost: DecodeCost | None
) -> Placement | None:
    """Prefill on one instance, decode on another: the policy picks each half among the
    instances of that role. slo-pd first places the request whole where it fits within
    both targets (`spare_capacity`), else picks the decode half knowing the prefill
    instance and with the cost model (`slo_pd.decode_instance`): it may keep the decode
    there (hybrid)."""
    if policy is slo_pd:
        whole = whole_request_instance(request, snapshot, cost)  # under capacity
        if whole is not None:
            return Placement(whole)
        prefill_id = prefill_instance(request, snapshot, cost)
    else:
        prefill_id = policy(replace(request, roles=("prefill",)), snapshot)
    if prefill_id is None:
        return None
    if policy is slo_pd:
        decode_id = decode_instance(request, snapshot, prefill_id, cost)
    else:
        decode_id = policy(replace(request, roles=("decode",)), snapshot)
    if decode_id is None:
        return None
    if decode_id == prefill_id:
        return Placement(prefill_id)
    return Placement(decode_id, prefill_instance_id=prefill_id)


def _offline(
    request: PlacementRequest, snapshot: ClusterSnapshot, cost: DecodeCost | None, colocated: bool
) -> Placement | None:
    """Colocated: the most headroom. PD: prefill in the relaxed pool; decode in the strict
    pool if an instance there admits it, else on the prefill instance (a `GenerateCmd`)."""
    if colocated:
        instance_id = colocation.most_headroom(request, snapshot)
        return None if instance_id is None else Placement(instance_id)
    prefill_id = colocation.offline_prefill_instance(request, snapshot)
    if prefill_id is None:
        return None
    decode_id = colocation.offline_decode_instance(request, snapshot, cost)
    if decode_id is None:
        return Placement(prefill_id)
    return Placement(decode_id, prefill_instance_id=prefill_id)


def note(request: PlacementRequest, placement: Placement) -> Note:
    """What the registry records of `placement`: the work each instance will compute for it,
    which is its uncached prompt tokens (a prefix hit is not recomputed), plus the output
    where it decodes."""
    decode_id, prefill_id = placement.instance_id, placement.prefill_instance_id
    decode = (decode_id, request.uncached_tokens(decode_id) + request.max_tokens)
    offline = request.priority > 0
    if prefill_id is None:
        return Note((decode,), offline, request.max_tokens)
    prefill = (prefill_id, request.uncached_tokens(prefill_id))
    return Note((prefill, decode), offline, request.max_tokens)
