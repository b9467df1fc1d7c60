"""Discrete-event simulation of a cluster driven by the live scheduler's own policy code.

Events (a heap ordered by time): a request arrives, an instance finishes a step, a
request's KV lands on its decode instance. On arrival the simulator does what
`SchedulerService.on_submit` does, with the same functions (`services.scheduler.placement`)
and objects: `check`; prefix hits for policies that read them (the instances' caches,
standing in for the kvstore, and the live `RecentPlacements`); `place` with the policy on
the real `Registry`'s snapshot; then the `note` of the work each instance will compute.
Instances step as our engine does (instance.py: the engine's own scheduler and block
manager), each step lasting what the cost model says, and a disaggregated request's KV
reaches its decode instance `kv_transfer_time` after its prefill, its blocks held on the
prefill instance until then.

Heartbeats: every instance sends one each `heartbeat_interval` (staggered, as independent
processes are), so policies see the same stale load plus pending placements as live. They
are delivered lazily but exactly: an instance's state only changes at its own events, so
before any state change and before any placement, each instance's latest due heartbeat is
built from its current state (the state it had at that heartbeat's time) and handed to
the registry. No per-heartbeat events, yet the same picture as a heartbeat every 250 ms.

Role flips (policies in `POLICIES_FLIPPING_ROLES`, i.e. slo-pd): every `PLAN_INTERVAL` the
simulator runs the live rebalancer's round, `services.scheduler.rebalance.rebalance` (all due
heartbeats delivered first), and hands each flip to its instance at once (live, a
`SetRoleCmd` a NATS hop away, applied between two steps). Placements carry the SLO targets
as live (`placement_request`, from the same `FlipConfig`).

Offline work (`backlog.OfflineBacklog`): requests of priority > 0 submitted beside the
trace, a bounded number at a time as live offline workers do, and placed by the same
`place` (its co-location rules); the engine's scheduler in each instance runs them after
online work and preempts them for it.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from services.scheduler.cluster import Registry
from services.scheduler.cost_model import kv_transfer_time, step_time
from services.scheduler.placement import Note, Refusal, check, note, place, placement_request
from services.scheduler.policies import FlipConfig, PlacementRequest, Policy
from services.scheduler.policies.colocation import DecodeCost
from services.scheduler.prefix import RecentPlacements
from services.scheduler.rebalance import PLAN_INTERVAL, rebalance
from services.scheduler.sim.backlog import OfflineBacklog
from services.scheduler.sim.instance import (
    HASH_BLOCK_TOKENS,
    InstanceSpec,
    ScheduledStep,
    SimInstance,
    SimRequest,
)
from services.scheduler.sim.serving import ServingOverheads
from services.scheduler.sim.tiers import TierSetup
from xllm.hardware import HardwareProfile
from xllm.models.config import ModelConfig

ARRIVE, STEP_DONE, KV_LANDED, PLAN, LOADED, CALL = 0, 1, 2, 3, 4, 5


@dataclass(frozen=True, slots=True)
class ClusterSpec:
    roles: tuple[str, ...]
    """One entry per instance: "both", "prefill" or "decode"."""
    instance: InstanceSpec
    heartbeat_interval: float = 0.25
    """`InstanceConfig.heartbeat_interval`'s default."""
    model_name: str = "m"
    overheads: ServingOverheads = field(default_factory=ServingOverheads)
    """What serving adds to the engines' steps (serving.py; none by default)."""

    @classmethod
    def colocated(cls, num_instances: int, instance: InstanceSpec, **kw) -> ClusterSpec:
        return cls(("both",) * num_instances, instance, **kw)


class Simulator:
    def __init__(
        self,
        model: ModelConfig,
        hw: HardwareProfile,
        cluster: ClusterSpec,
        policy: Policy,
        uses_prefix_hits: bool = False,
        targets: FlipConfig | None = None,
        flip_roles: bool = False,
        decode_cost: DecodeCost | None = None,
    ):
        self.model = model
        self.hw = hw
        self.cluster = cluster
        self.policy = policy
        self.uses_prefix_hits = uses_prefix_hits
        """As live, only policies that read `prefix_hits` get them (`POLICIES_USING_...`)."""
        self.targets = targets or FlipConfig()
        """The live scheduler's `flip_config`: SLO targets for placements, flip options."""
        self.flip_roles = flip_roles
        """Run the rebalancer (live: policies in `POLICIES_FLIPPING_ROLES`)."""
        self.decode_cost = decode_cost or DecodeCost(model, hw)
        """What offline decode admission predicts with (live: `--cost-profile/--cost-model`);
        by default the simulation's own cost model, so its predictions are exact."""
        self.backlog = OfflineBacklog(())
        self._num_online_left = 0
        self.plan_interval = PLAN_INTERVAL
        self.num_role_flips = 0
        self.flips: list[tuple[float, str, str]] = []
        """Every flip ordered: (time, instance id, new role)."""
        self.recent = RecentPlacements()
        spec = cluster.instance
        self.store: set[int] | None = set() if spec.kv_store else None
        """The cluster store's block hashes (sim/tiers.py), None without one."""
        tiers = TierSetup(
            self.store, model.kv_bytes_per_token * spec.block_size, hw.tier_bandwidth()
        )
        self.instances = [
            SimInstance(f"inst-{i:03d}", spec, role, cluster.model_name, tiers)
            for i, role in enumerate(cluster.roles)
        ]
        self._by_id = {inst.instance_id: inst for inst in self.instances}
        self._index = {inst.instance_id: i for i, inst in enumerate(self.instances)}
        self.registry = Registry(timeout=math.inf)
        n, interval = len(self.instances), cluster.heartbeat_interval
        self._hb_offset = [interval * i / n for i in range(n)]
        self._last_hb = [-math.inf] * n
        self._events: list[tuple[float, int, int, object]] = []
        self._order = itertools.count()
        self._num_work_events = 0
        """Events other than PLAN in the heap: the rebalancer stops when none are left."""
        self._until = 0.0
        self.num_placed = 0
        self.now = 0.0

    # -- running -------------------------------------------------------------------------------

    def run(
        self,
        requests: Sequence[SimRequest],
        until: float = 0.0,
        backlog: OfflineBacklog | None = None,
    ) -> list[SimRequest]:
        """Replay `requests` (sorted by arrival) to the end, with `backlog`'s offline
        requests beside them while they last; returns them and the offline requests
        submitted, with their times. With role
        flips, the rebalancer keeps planning until the last request is done, or until
        `until` if later (to see flips back after the load is gone)."""
        self._until = until
        self.backlog = backlog or OfflineBacklog(())
        self._num_online_left = len(requests)
        for i in range(len(self.instances)):  # every instance has joined at t = 0
            self._deliver(i, 0.0)
        for req in [*self.backlog.start(), *requests]:  # placed once through the hops
            self._push(req.arrival + self.cluster.overheads.request, ARRIVE, req)
        if self.flip_roles:
            self._push(self.plan_interval, PLAN, None)
        while self._events:
            self.now, _, kind, payload = heapq.heappop(self._events)
            if kind != PLAN:
                self._num_work_events -= 1
            if kind == ARRIVE:
                self._on_arrival(payload)  # type: ignore[arg-type]
            elif kind == STEP_DONE:
                self._on_step_done(*payload)  # type: ignore[misc]
            elif kind == KV_LANDED:
                self._on_kv_landed(*payload)  # type: ignore[misc]
            elif kind == LOADED:
                self._on_loaded(*payload)  # type: ignore[misc]
            elif kind == CALL:  # a subclass's own event (epd_sim.py): (function, args)
                payload[0](*payload[1])  # type: ignore[index]
            else:
                self._on_plan()
        return [*requests, *self.backlog.submitted]

    def _push(self, at: float, kind: int, payload: object) -> None:
        if kind != PLAN:
            self._num_work_events += 1
        heapq.heappush(self._events, (at, next(self._order), kind, payload))

    # -- heartbeats ---------------------------------------------------------------------------

    def _flush_heartbeat(self, i: int) -> None:
        """Hand the registry instance i's latest heartbeat due by now, if not yet delivered."""
        offset, interval = self._hb_offset[i], self.cluster.heartbeat_interval
        if self.now < offset:
            return
        due = offset + math.floor((self.now - offset) / interval) * interval
        if due > self._last_hb[i]:
            self._deliver(i, due)

    def _deliver(self, i: int, sent_at: float) -> None:
        self.registry.update(self.instances[i].heartbeat(sent_at), sent_at)
        self._last_hb[i] = sent_at

    def _flush_all(self) -> None:
        for i in range(len(self.instances)):
            self._flush_heartbeat(i)

    # -- events ------------------------------------------------------------------------------------

    def _on_plan(self) -> None:
        """`SchedulerService._rebalance`, one round: plan, note, deliver the flips."""
        self._flush_all()
        for instance_id, role in rebalance(self.registry, self.now, self.targets, self.decode_cost):
            self._by_id[instance_id].set_role(role)
            self.num_role_flips += 1
            self.flips.append((self.now, instance_id, role))
        if self._num_work_events or self.now + self.plan_interval <= self._until:
            self._push(self.now + self.plan_interval, PLAN, None)

    def _on_arrival(self, req: SimRequest) -> None:
        self._place(req)

    def _place(self, req: SimRequest) -> None:
        """`SchedulerService.on_submit`: the same `check`, `place` and `note`."""
        self._flush_all()
        snapshot = self.registry.snapshot(self.now)
        if check(None, req.num_prompt_tokens, snapshot) is not None:
            self._reject(req)
            return
        request = self._placement_request(req)
        decision = place(request, snapshot, self.policy, self.decode_cost)
        if isinstance(decision, Refusal):
            self._reject(req)
            return
        self._record(req, note(request, decision))
        self.num_placed += 1
        if decision.prefill_instance_id is None:
            req.instance_id = decision.instance_id
        else:
            req.instance_id, req.decode_instance_id = (
                decision.prefill_instance_id,
                decision.instance_id,
            )
        if req.decode_instance_id is None:
            self._add(self._by_id[req.instance_id], req)
        else:  # live: the DecodeCmd; the decode side asks for the prefill once reserved
            target = self._by_id[req.decode_instance_id]
            target.reserve(req, self.now)
            self._start_prefills(target)

    def _add(self, inst: SimInstance, req: SimRequest, hand_over: bool = False) -> None:
        """Queue `req` on `inst`, or first load its prefix from a slower tier."""
        load_seconds = inst.add(req, hand_over=hand_over, now=self.now)
        if load_seconds is None:
            self._kick(inst)
        else:
            self._push(self.now + load_seconds, LOADED, (inst, req))

    def _on_loaded(self, inst: SimInstance, req: SimRequest) -> None:
        self._flush_heartbeat(self._index[inst.instance_id])
        inst.finish_load(req)
        self._kick(inst)

    def _reject(self, req: SimRequest) -> None:
        req.rejected = True
        self._done(req)

    def _done(self, req: SimRequest) -> None:
        """`req` finished or was refused: count it; an offline one makes room for the next."""
        if req.priority == 0:
            self._num_online_left -= 1
            return
        following = self.backlog.done(self.now, online_over=self._num_online_left == 0)
        if following is not None:
            self._push(self.now, ARRIVE, following)

    def _record(self, req: SimRequest, noted: Note) -> None:
        """`SchedulerService._record`: pending work, and recent prefix placements."""
        for instance_id, num_tokens in noted.pending_tokens:
            self.registry.note_placement(
                instance_id, num_tokens, noted.offline, noted.outputs_on(instance_id)
            )
        if self.uses_prefix_hits:
            for instance_id in noted.holders:
                self.recent.add(req.hash_ids, instance_id, self.now)

    def _placement_request(self, req: SimRequest) -> PlacementRequest:
        """`SchedulerService._placement_request`."""
        hits: dict[str, int] = {}
        tiers: dict[str, dict[str, int]] = {}
        if self.uses_prefix_hits:
            hits, tiers = self._prefix_hits(req)
        return placement_request(
            request_id=req.request_id,
            num_prompt_tokens=req.num_prompt_tokens,
            max_tokens=req.output_len,
            model=None,
            priority=req.priority,
            sequence_number=self.num_placed,
            prefix_hits=hits,
            targets=self.targets,
            prefix_tiers=tiers,
            store_blocks=self._store_blocks(req) if self.uses_prefix_hits else 0,
            tier_bandwidth=self.hw.tier_bandwidth(),
        )

    def _prefix_hits(self, req: SimRequest) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
        """`PrefixMatcher.match`: per instance, the larger of what its cache holds (the
        kvstore's answer, here without its few hundred ms of lag) and what was recently
        placed there; instances with no hit are left out. With KV tiers, also each hit's
        blocks by tier (device, host), as the kvstore's index records them."""
        recent = self.recent.match(req.hash_ids, self.now)
        hits, tiers = {}, {}
        for inst in self.instances:
            placed = recent.get(inst.instance_id, 0) * HASH_BLOCK_TOKENS
            tokens = max(inst.cached_prefix_tokens(req), inst.usable_hit(req, placed))
            if inst.tiers is not None and (found := inst.prefix_tiers(req, tokens)):
                tiers[inst.instance_id] = found
                tokens = sum(found.values()) * inst.spec.block_size
            if tokens:
                hits[inst.instance_id] = tokens
        return hits, tiers

    def _store_blocks(self, req: SimRequest) -> int:
        """Leading prompt blocks in the cluster store (the kvstore's `store_blocks`)."""
        if self.store is None:
            return 0
        hashes = req.block_hashes(self.cluster.instance.block_size)
        limit = (req.num_prompt_tokens - 1) // self.cluster.instance.block_size
        n = 0
        while n < min(limit, len(hashes)) and hashes[n] in self.store:
            n += 1
        return n

    def _kick(self, inst: SimInstance) -> None:
        """Start `inst`'s next step now, if it is idle and has something it can run."""
        if inst.busy:
            return
        step = inst.schedule() if inst.has_work else None
        if step is not None and step.is_empty:
            step = None  # nothing fits (no KV room): wait for a step elsewhere to free some
        side = self._side_seconds(inst, step)
        if step is None and not side:
            return
        overheads = self.cluster.overheads
        seconds = side + (
            step_time(self.model, step.shape, self.hw) + overheads.step if step else 0
        )
        if overheads.cores:  # the instances share the CPU: count the busy ones
            seconds *= overheads.stretch(1 + sum(i.busy for i in self.instances))
        inst.busy = True
        inst.busy_time += seconds
        self._push(self.now + seconds, STEP_DONE, (inst, step, seconds))

    def _side_seconds(self, inst: SimInstance, step: ScheduledStep | None) -> float:
        """Seconds of work beside the model's step that this step also does (none here;
        epd_sim.py: encoding images); with no step, work that runs alone."""
        return 0.0

    def _side_done(self, inst: SimInstance) -> None:
        """The step of `inst` that `_side_seconds` priced is over."""

    def _on_step_done(self, inst: SimInstance, step: ScheduledStep | None, seconds: float) -> None:
        self._flush_heartbeat(self._index[inst.instance_id])
        inst.busy = False
        self._side_done(inst)
        for req in inst.update(step, self.now, seconds) if step is not None else ():
            if inst.is_prefilled(req):
                self._hand_over(inst, req)
        self._take_finished(inst)
        self._start_prefills(inst)
        self._kick(inst)

    def _take_finished(self, inst: SimInstance) -> None:
        for req in inst.take_finished():
            self._done(req)

    def _start_prefills(self, decode: SimInstance) -> None:
        """The prefill halves of the requests `decode` has just reserved blocks for."""
        hop = self.cluster.overheads.prefill_hop
        for req in decode.take_reserved():
            if hop:  # live: a PrefillCmd from the decode instance, a NATS hop away
                self._push(self.now + hop, CALL, (self._start_prefill, (req,)))
            else:
                self._start_prefill(req)

    def _start_prefill(self, req: SimRequest) -> None:
        inst = self._by_id[req.instance_id]  # type: ignore[index]
        self._flush_heartbeat(self._index[inst.instance_id])
        self._add(inst, req, hand_over=True)

    def _hand_over(self, source: SimInstance, req: SimRequest) -> None:
        """Send a finished prefill's KV to the decode instance chosen at placement."""
        delay = kv_transfer_time(self.model, req.num_prompt_tokens, self.hw)
        delay += self.cluster.overheads.handoff
        target = self._by_id[req.decode_instance_id]  # type: ignore[index]
        self._push(self.now + delay, KV_LANDED, (source, target, req))

    def _on_kv_landed(self, source: SimInstance, target: SimInstance, req: SimRequest) -> None:
        """The transfer is done: the prefill side frees its blocks, the decode side takes
        the request (both may now have room for more)."""
        self._flush_heartbeat(self._index[source.instance_id])
        self._flush_heartbeat(self._index[target.instance_id])
        source.release_prefilled(req)
        target.add_prefilled(req, self.now)
        self._take_finished(target)
        self._start_prefills(target)
        self._kick(target)
        self._kick(source)
