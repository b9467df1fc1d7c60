"""The scheduler service: registry from heartbeats, placement on submit, cluster view.

Handlers run on the event loop and share state without locks (asyncio, one thread).
Submit: the decision is `placement.place`'s (shared with the simulator); this file only
sends the command it says and replies with where the request went. Heartbeats keep the registry; a sweeper drops instances
that fell silent, so new requests go elsewhere within `heartbeat_timeout`. Faster, where a
supervisor watches the processes (`xllm up`): its `InstanceExited` drops the instance the
moment its process exits, and the heartbeats its run sent before dying are ignored. With a policy
that flips roles (slo-pd), a rebalancer asks `plan_role_flips` every `PLAN_INTERVAL` and
sends the `SetRoleCmd`s it plans.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

from nats.aio.client import Client as NATS

from services.scheduler.cluster import ClusterSnapshot, Registry
from services.scheduler.config import SchedulerConfig
from services.scheduler.encode import encode_remotely, pick_encoder
from services.scheduler.placement import (
    ALL_ROLES,
    Note,
    Placement,
    Refusal,
    check,
    decode_cost,
    note,
    place,
    placement_request,
)
from services.scheduler.policies import (
    POLICIES_FLIPPING_ROLES,
    POLICIES_USING_PREFIX_HITS,
    PlacementRequest,
    get_policy,
)
from services.scheduler.prefix import PrefixMatch, PrefixMatcher, hash_prompt
from services.scheduler.rebalance import PLAN_INTERVAL, flip_config, rebalance
from xllm.hardware import tier_bandwidth
from xllm.protocol import (
    ClusterState,
    ClusterStateRequest,
    DecodeCmd,
    ErrorInfo,
    GenerateCmd,
    Heartbeat,
    InstanceExited,
    InstanceLost,
    SetRoleCmd,
    SubmitReply,
    SubmitRequest,
    TypeDispatcher,
    encode,
    make_callback,
    subjects,
)

log = logging.getLogger(__name__)


class SchedulerService:
    def __init__(self, config: SchedulerConfig, nc: NATS):
        self.config = config
        self.nc = nc
        self.policy = get_policy(config.policy)
        self.prefix = PrefixMatcher(nc, timeout=config.kv_match_timeout)
        self.uses_prefix_hits = config.policy in POLICIES_USING_PREFIX_HITS
        self.registry = Registry(config.heartbeat_timeout)
        self.num_submitted = 0
        self.num_rejected = 0
        self.num_redispatched = 0
        self.num_role_flips = 0
        self.num_shed = 0
        """Online requests refused by SLO admission (their TTFT target was out of reach)."""
        self.flip_config = flip_config(config)
        self.decode_cost = decode_cost(config)
        """Predicts decode steps for offline decode admission (None: not configured)."""
        self.tier_bandwidth = tier_bandwidth(self.decode_cost.hw if self.decode_cost else None)
        """What cache-aware prices a prefix's loads with: `--cost-profile`'s bandwidths."""

    async def serve(self, stop: asyncio.Event) -> None:
        heartbeats = TypeDispatcher({Heartbeat: self.on_heartbeat}, name="scheduler heartbeats")
        requests = TypeDispatcher(
            {SubmitRequest: self.on_submit, ClusterStateRequest: self.on_cluster_state},
            name="scheduler requests",
        )
        exits = TypeDispatcher({InstanceExited: self.on_instance_exited}, name="scheduler exits")
        subs = [
            await self.nc.subscribe(subjects.HEARTBEAT, cb=make_callback(heartbeats)),
            await self.nc.subscribe(subjects.INSTANCE_EXITED, cb=make_callback(exits)),
            await self.nc.subscribe(
                subjects.SCHED_SUBMIT, queue=subjects.SCHEDULER_QUEUE, cb=make_callback(requests)
            ),
            await self.nc.subscribe(subjects.CLUSTER_STATE, cb=make_callback(requests)),
        ]
        tasks = [asyncio.create_task(self._sweep(stop))]
        if self.config.policy in POLICIES_FLIPPING_ROLES:
            tasks.append(asyncio.create_task(self._rebalance(stop)))
        log.info("scheduler up, policy %s", self.config.policy)
        await stop.wait()
        for task in tasks:
            task.cancel()
        for sub in subs:
            await sub.unsubscribe()

    async def on_heartbeat(self, hb: Heartbeat) -> None:
        if self.registry.is_dead_run(hb):
            return  # sent before its process died, arrived after the supervisor said so
        lost_run = self.registry.restarted(hb)
        if lost_run is not None:
            # Whatever the old run held is gone: gateways resume its requests and peers free
            # their transfers with it now, not after a heartbeat timeout that never comes.
            log.warning("instance %s restarted: its earlier run is lost", hb.instance_id)
            self.registry.forget(hb.instance_id)
            lost = InstanceLost(instance_id=hb.instance_id, reason="restarted", started_at=lost_run)
            await self.nc.publish(subjects.INSTANCE_LOST, encode(lost))
        if self.registry.update(hb, time.monotonic()):
            log.info("instance %s joined (%s, %s)", hb.instance_id, hb.role, hb.model)

    async def on_instance_exited(self, exited: InstanceExited) -> None:
        view = self.registry.drop_exited(exited.instance_id, exited.exited_at)
        if view is None:  # unknown here, already dropped, or a later run already serves
            return
        reason = f"process exited ({exited.returncode})"
        log.warning("instance %s: %s, out of rotation", exited.instance_id, reason)
        lost = InstanceLost(
            instance_id=exited.instance_id, reason=reason, started_at=view.heartbeat.started_at
        )
        await self.nc.publish(subjects.INSTANCE_LOST, encode(lost))

    async def _sweep(self, stop: asyncio.Event) -> None:
        interval = self.config.heartbeat_timeout / 4
        while not stop.is_set():
            for view in self.registry.expire(time.monotonic()):
                instance_id = view.instance_id
                log.warning("instance %s missed its heartbeats: out of rotation", instance_id)
                # Gateways resume its requests elsewhere; the resubmits count as redispatches.
                lost = InstanceLost(instance_id=instance_id, started_at=view.heartbeat.started_at)
                await self.nc.publish(subjects.INSTANCE_LOST, encode(lost))
            await asyncio.sleep(interval)

    async def _rebalance(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(PLAN_INTERVAL)
            try:
                # Planned and noted in the registry (the simulator runs the same function);
                # a lost SetRoleCmd is forgotten after PENDING_ROLE_TIMEOUT, then re-planned.
                for instance_id, role in rebalance(
                    self.registry, time.monotonic(), self.flip_config, self.decode_cost
                ):
                    log.info("flipping instance %s to %s", instance_id, role)
                    cmd = SetRoleCmd(role=role)  # type: ignore[arg-type]
                    await self.nc.publish(subjects.instance_cmd(instance_id), encode(cmd))
                    self.num_role_flips += 1
            except Exception:  # a bad plan must not stop the rebalancing for good
                log.exception("role-flip planning failed")

    async def on_submit(self, req: SubmitRequest) -> SubmitReply:
        """Place `req` (`placement.place`), send the command the placement says, note it."""
        snapshot = self.registry.snapshot(time.monotonic())
        refused = check(req.request.model, len(req.request.prompt_token_ids), snapshot)
        if refused is not None:  # before the kvstore round trip for prefix hits
            return self._refuse(req, refused)
        request = await self._placement_request(req, snapshot)
        decision = place(request, snapshot, self.policy, self.decode_cost)
        if isinstance(decision, Refusal):
            return self._refuse(req, decision)
        encoder_id = pick_encoder(req.request, snapshot)
        if encoder_id is not None:  # the encode step first: E+PD, E+P+D
            encoded = await encode_remotely(
                self.nc, req.request_id, req.request, encoder_id, self.config.encode_timeout
            )
            if isinstance(encoded, ErrorInfo):
                self.num_rejected += 1
                return SubmitReply(request_id=req.request_id, error=encoded)
            req = dataclasses.replace(req, request=encoded)
        await self._send(req, decision, snapshot)
        self._record(req, note(request, decision))
        self.num_submitted += 1
        self.num_redispatched += req.resumed
        return SubmitReply(
            request_id=req.request_id,
            instance_id=decision.instance_id,
            prefill_instance_id=decision.prefill_instance_id,
        )

    def _refuse(self, req: SubmitRequest, refused: Refusal) -> SubmitReply:
        self.num_rejected += 1
        self.num_shed += refused.shed
        error = ErrorInfo(code=refused.code, message=refused.message)
        return SubmitReply(request_id=req.request_id, error=error)

    async def _send(self, req: SubmitRequest, placement: Placement, snapshot: ClusterSnapshot):
        """Colocated: a `GenerateCmd`; disaggregated: a `DecodeCmd` to the decode instance,
        which takes it from there (it asks the prefill instance for the KV)."""
        prefill_id = placement.prefill_instance_id
        if prefill_id is None:
            cmd: GenerateCmd | DecodeCmd = GenerateCmd(
                request_id=req.request_id,
                request=req.request,
            )
        else:
            cmd = DecodeCmd(
                request_id=req.request_id,
                request=req.request,
                prefill_instance_id=prefill_id,
                prefill_started_at=snapshot.view(prefill_id).heartbeat.started_at,
            )
        await self.nc.publish(subjects.instance_cmd(placement.instance_id), encode(cmd))

    def _record(self, req: SubmitRequest, noted: Note) -> None:
        for instance_id, num_tokens in noted.pending_tokens:
            self.registry.note_placement(
                instance_id, num_tokens, noted.offline, noted.outputs_on(instance_id)
            )
        if self.uses_prefix_hits:
            views = self.registry.snapshot()
            for instance_id in noted.holders:
                block_size = views.view(instance_id).heartbeat.kv_block_size
                self.prefix.placed(hash_prompt(req.request), instance_id, block_size)

    async def _placement_request(
        self, req: SubmitRequest, snapshot: ClusterSnapshot
    ) -> PlacementRequest:
        match = PrefixMatch()
        if self.uses_prefix_hits:
            candidates = {
                v.instance_id: v.heartbeat.kv_block_size
                for v in snapshot.candidates(req.request.model, ALL_ROLES)
            }
            match = await self.prefix.match(hash_prompt(req.request), candidates)
        return placement_request(
            request_id=req.request_id,
            num_prompt_tokens=len(req.request.prompt_token_ids),
            max_tokens=req.request.sampling.max_tokens,
            model=req.request.model,
            priority=req.request.priority,
            sequence_number=self.num_submitted,
            prefix_hits=match.hits,
            targets=self.flip_config,
            prefix_tiers=match.tiers,
            store_blocks=match.store_blocks,
            tier_bandwidth=self.tier_bandwidth,
        )

    async def on_cluster_state(self, _: ClusterStateRequest) -> ClusterState:
        views = self.registry.snapshot().instances
        return ClusterState(
            instances=[v.heartbeat for v in views],
            role_counts={role: sum(v.role == role for v in views) for role in ALL_ROLES},
            num_role_flips=self.num_role_flips,
            policy=self.config.policy,
            num_submitted=self.num_submitted,
            num_rejected=self.num_rejected,
            num_shed=self.num_shed,
            num_redispatched=self.num_redispatched,
            sent_at=time.time(),
        )
