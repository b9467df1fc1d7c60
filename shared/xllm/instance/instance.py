"""Instance: the engine behind NATS — commands in, token deltas and heartbeats out.

NATS callbacks never touch the engine: they decode and queue commands in `inbox`. The
engine loop applies queued commands only between steps, then runs one step in a worker
thread (the asyncio loop stays free to receive, publish and heartbeat), then publishes one
`TokenDelta` per completion that produced tokens. So aborts, new requests and role flips
take effect at step boundaries and need no locking.

PD disaggregation (report §3.2) lives in `PdRequests` (disaggregation.py): its commands
are queued and applied like the others, and the Mooncake transport it needs is created
when the instance first takes the prefill or decode role.

KV events (report §3.4) follow the same rule: the loop collects the block manager's
stored/evicted events after each step, a timer publishes them in batches (`KvEventPublisher`),
and a `KvSnapshotRequest` from the kvstore is queued like a command and answered between
steps with every cached block hash.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nats.aio.client import Client as NATS

from xllm.engine.engine import Engine, SequenceOutput
from xllm.engine.sequence import FinishReason
from xllm.instance.config import InstanceConfig
from xllm.instance.disaggregation import PdRequests, TransferDone, wire_logprob
from xllm.instance.kv_events import KvEventPublisher
from xllm.protocol import (
    AbortCmd,
    DecodeCmd,
    DraftCounts,
    ErrorCode,
    ErrorInfo,
    GenerateCmd,
    Heartbeat,
    InstanceLost,
    KvReady,
    KvSnapshotRequest,
    PrefillCmd,
    SetRoleCmd,
    TokenDelta,
    TypeDispatcher,
    encode,
    subjects,
)

log = logging.getLogger(__name__)

Command = (
    GenerateCmd
    | AbortCmd
    | SetRoleCmd
    | KvSnapshotRequest
    | DecodeCmd
    | PrefillCmd
    | KvReady
    | TransferDone
    | InstanceLost
)


def engine_thread() -> ThreadPoolExecutor:
    """The one thread that runs torch for an instance: loading the model and every step.

    OpenMP keeps a team of worker threads per thread that calls it. With two teams alive (one
    from loading, one from stepping) there are more OpenMP threads than cores, and libgomp
    then stops spinning between parallel regions: every region pays a futex wake-up, which
    made decode steps ~20% slower on 2 cores.
    """
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")


class Instance:
    def __init__(
        self,
        config: InstanceConfig,
        engine: Engine,
        nc: NATS,
        executor: ThreadPoolExecutor | None = None,
    ):
        config.validate()
        self.config = config
        self.engine = engine
        self.nc = nc
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        subjects.token(self.instance_id)  # fail fast on an id NATS cannot route
        self.role = config.role
        self.model_name = config.served_model_name or Path(engine.config.model).name
        self.inbox: asyncio.Queue[Command] = asyncio.Queue()
        self.dispatcher = TypeDispatcher(name=f"instance {self.instance_id}")
        for cmd_type in (GenerateCmd, AbortCmd, SetRoleCmd, DecodeCmd, PrefillCmd, KvReady):
            self.dispatcher.register(cmd_type, self._enqueue)
        self.kv_events = KvEventPublisher(nc, self.instance_id)
        self.snapshots = TypeDispatcher(
            {KvSnapshotRequest: self._on_snapshot_request, InstanceLost: self._enqueue},
            name=f"instance {self.instance_id} notices",
        )
        # One thread: steps run strictly one after another, off the event loop, on the
        # thread that loaded the model (see engine_thread).
        self.executor = executor or engine_thread()
        self._background: set[asyncio.Task] = set()  # keeps fire-and-forget tasks alive
        self.pd: PdRequests | None = None
        """PD disaggregation state; created when the instance first needs it."""
        self.role_flips = 0
        self.started_at = time.time()
        """Which run of this instance id this is (`Heartbeat.started_at`)."""

    async def _enqueue(self, cmd: Command) -> None:
        self.inbox.put_nowait(cmd)

    async def _on_snapshot_request(self, req: KvSnapshotRequest) -> None:
        if req.instance_id in (None, self.instance_id):
            self.inbox.put_nowait(req)

    async def serve(self, stop: asyncio.Event) -> None:
        async def on_command(msg) -> None:
            await self.dispatcher.dispatch(msg.data, msg.subject)

        async def on_notice(msg) -> None:
            await self.snapshots.dispatch(msg.data, msg.subject)

        subs = [
            await self.nc.subscribe(subjects.instance_cmd(self.instance_id), cb=on_command),
            await self.nc.subscribe(subjects.KV_SNAPSHOT_REQUEST, cb=on_notice),
            await self.nc.subscribe(subjects.INSTANCE_LOST, cb=on_notice),
        ]
        await self.kv_events.reset()
        if self.role != "both":
            self._pd()  # the transport's endpoint goes out with the first heartbeat
        tasks = [
            asyncio.create_task(self._heartbeats(stop)),
            asyncio.create_task(self._loop(stop)),
            asyncio.create_task(self._kv_event_flusher(stop)),
        ]
        log.info("instance %s (%s) serving %s", self.instance_id, self.role, self.model_name)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in subs:
            await sub.unsubscribe()
        self.executor.shutdown(wait=True)
        if self.pd is not None:
            self.pd.transport.close()
        await self._retract_kv_blocks()

    def _pd(self) -> PdRequests:
        if self.pd is None:
            from xllm.kv_transfer.mooncake import KvTransport  # Mooncake only where needed

            loop = asyncio.get_running_loop()
            kv = self.engine.runner.kv_cache.tensor
            host = self.config.kv_transfer_host or socket.gethostbyname(socket.gethostname())
            transport = KvTransport(kv, self.engine.config.block_size, host)
            self.pd = PdRequests(
                self.instance_id,
                self.engine,
                transport,
                send_cmd=self._send_cmd,
                send_delta=self._send,
                notify_transfer_done=lambda done: loop.call_soon_threadsafe(
                    self._transfer_finished, done
                ),
                transfer_timeout=self.config.kv_transfer_timeout,
                started_at=self.started_at,
            )
            log.info("instance %s: KV transfer endpoint %s", self.instance_id, transport.endpoint)
        return self.pd

    # -- the engine loop ------------------------------------------------------------------

    async def _loop(self, stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            if not self.engine.has_unfinished():
                await self._wait_for_command()  # idle: sleep until work arrives
            while not self.inbox.empty():
                await self._apply(self.inbox.get_nowait())
            if not self.engine.has_unfinished():
                continue
            try:
                deltas = await loop.run_in_executor(self.executor, self.engine.step)
            except Exception:
                log.exception("engine step failed; failing the running requests")
                await self._fail_all("the engine failed while running this request")
                continue
            self.kv_events.collect(self.engine.block_manager)  # between steps: safe to read
            for delta in deltas:
                await self._send(to_wire(delta))
                if self.pd is not None and delta.request_id in self.pd.prefilling:
                    await self.pd.on_step_output(delta)
            await self._pd_housekeeping()

    def _transfer_finished(self, done: TransferDone) -> None:
        """On the loop, as soon as a KV write ends, even mid-step (see disaggregation.py)."""
        task = asyncio.ensure_future(self.pd.on_write_finished(done))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        self.inbox.put_nowait(done)

    async def _wait_for_command(self) -> None:
        if self.pd is None or not (self.pd.reserved or self.pd.awaiting_room):
            await self._apply(await self.inbox.get())
            return
        try:  # reservations wait on other instances: wake up to expire the abandoned
            await self._apply(await asyncio.wait_for(self.inbox.get(), timeout=1.0))
        except TimeoutError:
            await self._pd_housekeeping()

    async def _pd_housekeeping(self) -> None:
        if self.pd is not None:
            await self.pd.reserve_waiting()  # steps free blocks: queued reservations may fit
            await self.pd.expire_reservations(time.monotonic())

    async def _apply(self, cmd: Command) -> None:
        try:
            await self._apply_one(cmd)
        except Exception:  # one bad command must not stop the loop serving the others
            log.exception("instance %s: applying %s failed", self.instance_id, type(cmd).__name__)

    async def _apply_one(self, cmd: Command) -> None:
        if isinstance(cmd, GenerateCmd):
            await self._start(cmd)
        elif isinstance(cmd, AbortCmd):
            if self.pd is None or not await self.pd.abort(cmd.request_id):
                await self._abort(cmd.request_id)
        elif isinstance(cmd, SetRoleCmd):
            await self._set_role(cmd.role)
        elif isinstance(cmd, DecodeCmd):
            await self._pd().on_decode(cmd)
        elif isinstance(cmd, PrefillCmd):
            await self._pd().on_prefill(cmd)
        elif isinstance(cmd, KvReady):
            await self._pd().on_kv_ready(cmd)
        elif isinstance(cmd, TransferDone):
            await self._pd().on_transfer_done(cmd)
        elif isinstance(cmd, InstanceLost):
            if self.pd is not None:
                await self.pd.on_instance_lost(cmd.instance_id, cmd.started_at)
        elif isinstance(cmd, KvSnapshotRequest):
            num_blocks = await self.kv_events.snapshot(self.engine.block_manager)
            log.info("instance %s: KV snapshot of %d blocks sent", self.instance_id, num_blocks)

    async def _set_role(self, role: str) -> None:
        """Flip role without reloading anything (§3.2): requests already here finish in
        place; the scheduler sends new work by the new role. PD commands are served in
        either PD role (one placed just before the flip may still arrive)."""
        if role == self.role:
            return
        log.info("instance %s: role %s -> %s", self.instance_id, self.role, role)
        if role != "both":
            self._pd()
        self.role = role
        self.role_flips += 1

    async def _start(self, cmd: GenerateCmd) -> None:
        try:
            params = cmd.sampling.to_params()
            self.engine.add_request(
                cmd.request_id, list(cmd.prompt_token_ids), params, priority=cmd.priority
            )
        except ValueError as e:
            code = (
                ErrorCode.CONTEXT_LENGTH_EXCEEDED
                if "context" in str(e)
                else ErrorCode.INVALID_REQUEST
            )
            await self._send_error(cmd.request_id, ErrorInfo(code=code, message=str(e)))

    async def _abort(self, request_id: str) -> None:
        seqs = self.engine.sequences.get(request_id, [])
        unfinished = [s.index for s in seqs if not s.is_finished]
        if self.engine.abort_request(request_id):
            for index in unfinished:
                await self._send(
                    TokenDelta(request_id=request_id, index=index, finish_reason="abort")
                )

    async def _fail_all(self, message: str) -> None:
        for request_id in list(self.engine.sequences):
            self.engine.abort_request(request_id)
            await self._send_error(request_id, ErrorInfo(code=ErrorCode.INTERNAL, message=message))

    async def _send_error(self, request_id: str, error: ErrorInfo) -> None:
        await self._send(TokenDelta(request_id=request_id, finish_reason="error", error=error))

    async def _send_cmd(self, instance_id: str, cmd) -> None:
        await self.nc.publish(subjects.instance_cmd(instance_id), encode(cmd))

    async def _send(self, delta: TokenDelta) -> None:
        # nats-py only appends to its write buffer here; its flusher task does the I/O.
        await self.nc.publish(subjects.request_output(delta.request_id), encode(delta))

    # -- KV events ------------------------------------------------------------------------

    async def _kv_event_flusher(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await asyncio.sleep(self.config.kv_events_interval)
            try:
                await self.kv_events.flush()
            except Exception:  # a lost batch is a seq gap: the kvstore asks for a snapshot
                log.exception("publishing KV events failed")

    async def _retract_kv_blocks(self) -> None:
        """On a clean stop, tell the kvstore at once that this instance's blocks are gone
        (an empty reset), instead of leaving it to the heartbeat timeout."""
        try:
            await self.kv_events.reset()
        except Exception:
            log.warning("could not retract this instance's KV blocks", exc_info=True)

    # -- heartbeats -----------------------------------------------------------------------

    async def _heartbeats(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.nc.publish(subjects.HEARTBEAT, encode(self.heartbeat()))
            except Exception:
                log.exception("heartbeat failed")
            await asyncio.sleep(self.config.heartbeat_interval)

    def heartbeat(self) -> Heartbeat:
        stats = self.engine.stats()
        scheduler = self.engine.scheduler
        return Heartbeat(
            instance_id=self.instance_id,
            started_at=self.started_at,
            role=self.role,  # type: ignore[arg-type]
            model=self.model_name,
            max_model_len=self.engine.max_model_len,
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            # Work, not footprint: prompt tokens served from the prefix cache cost nothing,
            # as in the scheduler's own count of what it placed since this heartbeat.
            num_tokens_in_flight=sum(
                s.num_tokens - s.num_cached_tokens for s in [*scheduler.running, *scheduler.waiting]
            ),
            kv_blocks_used=stats.num_blocks_used,
            kv_blocks_free=stats.num_blocks_free,
            kv_block_size=self.engine.config.block_size,
            prefix_queried_tokens=stats.prefix_queried_tokens,
            prefix_hit_tokens=stats.prefix_hit_tokens,
            num_preemptions=stats.num_preemptions,
            steps=stats.num_steps,
            sent_at=time.time(),
            role_flips=self.role_flips,
            num_prefill_backlog_tokens=stats.num_prefill_backlog_tokens,
            num_decoding=stats.num_decoding,
            num_swapped=stats.num_swapped,
            num_swap_outs=stats.num_swap_outs,
            swap_out_blocks=stats.swap_out_blocks,
            swap_in_blocks=stats.swap_in_blocks,
            swap_seconds=stats.swap_seconds,
            num_draft_tokens=stats.num_draft_tokens,
            num_accepted_draft_tokens=stats.num_accepted_draft_tokens,
            recent_acceptance_rate=stats.recent_acceptance_rate,
            speculating=stats.speculating,
            **dataclasses.asdict(self.engine.step_stats),
            **self._transfer_stats(),
        )

    def _transfer_stats(self) -> dict:
        if self.pd is None:
            return {}
        t = self.pd.transport
        s = t.stats
        return dict(
            kv_transfer_endpoint=t.endpoint,
            kv_blocks_sent=s.blocks_sent,
            kv_bytes_sent=s.bytes_sent,
            kv_blocks_received=s.blocks_received,
            kv_bytes_received=s.bytes_received,
            kv_transfers=s.transfers,
            kv_transfer_seconds=s.seconds_sending,
        )


def to_wire(d: SequenceOutput) -> TokenDelta:
    logprobs = None
    if d.logprobs is not None:
        logprobs = [wire_logprob(lp) for lp in d.logprobs]
    finish = d.finish_reason.value if isinstance(d.finish_reason, FinishReason) else None
    return TokenDelta(
        request_id=d.request_id,
        index=d.index,
        token_ids=d.token_ids,
        logprobs=logprobs,
        finish_reason=finish,  # type: ignore[arg-type]
        num_prompt_tokens=d.num_prompt_tokens,
        num_cached_tokens=d.num_cached_tokens,
        num_output_tokens=d.num_output_tokens,
        drafts=DraftCounts(d.num_draft_tokens, d.num_accepted_draft_tokens)
        if d.num_draft_tokens
        else None,
    )
