"""Instance: the engine behind NATS — commands in, token deltas and heartbeats out.

NATS callbacks never touch the engine: they decode a message, keep it if its subject takes
that type, and queue it in `inbox`. The engine loop applies queued messages only between
steps, each through the one handler its type has in `handlers`, then runs one step in a
worker thread (the asyncio loop stays free to receive, publish and heartbeat), then
publishes one `TokenDelta` per completion that produced tokens. So aborts, new requests
and role flips take effect at step boundaries and need no locking.

PD disaggregation (report §3.2) is two small state machines, `DecodeSide` (pd_decode.py)
and `PrefillSide` (pd_prefill.py), sharing what the instance remembers about lost peers
and early aborts. Either role's commands are served in either PD role. The KV transport
is injected (`open_transport`, chosen by `--kv-transfer-backend`) and opened the first time
the instance takes a PD role or receives a PD command; a PD-colocated instance never
registers its pool.

KV events (report §3.4) follow the same rule: the loop collects the block manager's
stored/evicted events after each step, a timer publishes them in batches (`KvEventPublisher`),
and a `KvSnapshotRequest` from the kvstore is queued like a command and answered between
steps with every cached block hash.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nats.aio.client import Client as NATS

from xllm.encoder.config import EncodeRoleConfig
from xllm.engine.engine import Engine
from xllm.instance.config import InstanceConfig
from xllm.instance.early_aborts import EarlyAborts
from xllm.instance.encode_role import encode_role_tasks
from xllm.instance.heartbeat import build_heartbeat
from xllm.instance.images import ImageInputs
from xllm.instance.kv_events import KvEventPublisher
from xllm.instance.lost_peers import LostPeers
from xllm.instance.pd_decode import DecodeSide
from xllm.instance.pd_prefill import PrefillSide
from xllm.instance.wire import abort_delta, error_delta, rejection, to_wire
from xllm.kv_transfer import KvTransport, OpenTransport, open_transport
from xllm.protocol import (
    AbortCmd,
    DecodeCmd,
    DecodeError,
    ErrorCode,
    ErrorInfo,
    GenerateCmd,
    Heartbeat,
    InstanceLost,
    KvReady,
    KvSnapshotRequest,
    PrefillCmd,
    Role,
    SetRoleCmd,
    TokenDelta,
    decode,
    encode,
    subjects,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WriteEnded:
    """Internal: a prefill-side KV write is over; free its blocks at the step boundary."""

    request_id: str


COMMANDS = frozenset((GenerateCmd, AbortCmd, SetRoleCmd, DecodeCmd, PrefillCmd, KvReady))
"""What `instance_cmd(id)` carries."""
NOTICES = frozenset((KvSnapshotRequest, InstanceLost))
"""What the broadcast subjects this instance listens to carry."""

Command = (
    GenerateCmd
    | AbortCmd
    | SetRoleCmd
    | DecodeCmd
    | PrefillCmd
    | KvReady
    | KvSnapshotRequest
    | InstanceLost
    | WriteEnded
)
"""What the inbox holds: every key of `Instance.handlers`."""
Handler = Callable[[Any], Awaitable[None]]
"""Applies one queued message, on the loop, between engine steps."""


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
        open_transport: OpenTransport | None = None,
        encode_config: EncodeRoleConfig | None = None,
    ):
        """`open_transport` registers the engine's KV pool for PD transfers; None = the
        backend `config.kv_transfer_backend` names. `encode_config`: the encode role's
        options, with `config.serve_encode`."""
        config.validate()
        self.config = config
        self.engine = engine
        self.nc = nc
        self.instance_id = config.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        subjects.token(self.instance_id)  # fail fast on an id NATS cannot route
        self.role = Role(config.role or Role.BOTH)
        self.model_name = config.served_model_name or Path(engine.config.model).name
        self.inbox: asyncio.Queue[Command] = asyncio.Queue()
        self.kv_events = KvEventPublisher(nc, self.instance_id)
        # One thread: steps run strictly one after another, off the event loop, on the
        # thread that loaded the model (see engine_thread).
        self.executor = executor or engine_thread()
        self.open_transport = open_transport or default_transport(config)
        self._transport: KvTransport | None = None
        self._background: set[asyncio.Task] = set()  # keeps fire-and-forget tasks alive
        self._event_loop: asyncio.AbstractEventLoop | None = None
        """The loop `serve` runs on: where transfer threads hand their news to."""
        self.role_flips = 0
        self.started_at = time.time()
        """Which run of this instance id this is (`Heartbeat.started_at`)."""
        self.lost_peers = LostPeers()
        self.early_aborts = EarlyAborts()
        self.images = ImageInputs(config.kv_transfer_host)
        """Decodes a request's images, or reads the embeddings an encoder made."""
        self.decode = DecodeSide(
            self.instance_id,
            self.started_at,
            engine,
            self.transport,
            self._send_cmd,
            self._send,
            self.lost_peers,
            self.early_aborts,
            config.kv_transfer_timeout,
            self.images,
        )
        self.prefill = PrefillSide(
            engine,
            self.transport,
            self._send_cmd,
            self._write_ended,
            self.lost_peers,
            self.early_aborts,
            self.images,
        )
        self.encode_config = encode_config or EncodeRoleConfig()
        self.handlers = self._handler_table()
        """The one dispatch: every queued message is applied by the handler of its type."""

    def _handler_table(self) -> dict[type, Handler]:
        return {
            GenerateCmd: self._on_generate,
            AbortCmd: self._on_abort,
            SetRoleCmd: self._on_set_role,
            DecodeCmd: self.decode.on_decode,
            KvReady: self.decode.on_kv_ready,
            PrefillCmd: self.prefill.on_prefill,
            WriteEnded: self._on_write_ended,
            InstanceLost: self._on_instance_lost,
            KvSnapshotRequest: self._on_snapshot_request,
        }

    def transport(self) -> KvTransport:
        """The KV transport, opened on first use."""
        if self._transport is None:
            kv = self.engine.runner.kv_cache.tensor
            self._transport = self.open_transport(kv, self.engine.config.block_size)
            log.info(
                "instance %s: KV transfer endpoint %s", self.instance_id, self._transport.endpoint
            )
        return self._transport

    async def serve(self, stop: asyncio.Event) -> None:
        self._event_loop = asyncio.get_running_loop()
        subs = [
            await self.nc.subscribe(
                subjects.instance_cmd(self.instance_id), cb=self._receiver(COMMANDS)
            ),
            await self.nc.subscribe(subjects.KV_SNAPSHOT_REQUEST, cb=self._receiver(NOTICES)),
            await self.nc.subscribe(subjects.INSTANCE_LOST, cb=self._receiver(NOTICES)),
        ]
        await self.kv_events.reset()
        if self.role != "both":
            self.transport()  # its endpoint goes out with the first heartbeat
        tasks = [
            asyncio.create_task(self._heartbeats(stop)),
            asyncio.create_task(self._loop(stop)),
            asyncio.create_task(self._kv_event_flusher(stop)),
            *(encode_role_tasks(self, stop) if self.config.serve_encode else ()),
        ]
        log.info("instance %s (%s) serving %s", self.instance_id, self.role, self.model_name)
        await stop.wait()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sub in subs:
            await sub.unsubscribe()
        self.executor.shutdown(wait=True)
        if self._transport is not None:
            self._transport.close()
        await self._retract_kv_blocks()

    def _receiver(self, accepts: frozenset[type]) -> Callable[[Any], Awaitable[None]]:
        """A subscription callback: decode, keep what this subject carries, queue it.
        Anything else is logged and dropped (DESIGN.md §3: it never crashes the instance)."""

        async def on_message(msg) -> None:
            try:
                cmd = decode(msg.data)
            except DecodeError as e:
                log.warning("instance %s: dropped undecodable message on %r: %s",
                            self.instance_id, msg.subject, e)  # fmt: skip
                return
            if type(cmd) not in accepts:
                log.warning("instance %s: dropped %s on %r: not accepted there",
                            self.instance_id, type(cmd).__name__, msg.subject)  # fmt: skip
                return
            self.inbox.put_nowait(cmd)

        return on_message

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
            # between steps: safe to read
            self.kv_events.collect(self.engine.block_manager, self.engine.tiers)
            for delta in deltas:
                await self._send(to_wire(delta))
                if self.prefill.owns(delta.request_id):
                    await self.prefill.on_step_output(delta)
            await self._pd_housekeeping()

    async def _wait_for_command(self) -> None:
        if not self.decode.waits_on_peers():
            await self._apply(await self.inbox.get())
            return
        try:  # reservations wait on other instances: wake up to expire the abandoned
            await self._apply(await asyncio.wait_for(self.inbox.get(), timeout=1.0))
        except TimeoutError:
            await self._pd_housekeeping()

    async def _pd_housekeeping(self) -> None:
        await self.decode.reserve_waiting()  # steps free blocks: queued reservations may fit
        await self.decode.expire(time.monotonic())

    async def _apply(self, cmd: Command) -> None:
        try:
            await self.handlers[type(cmd)](cmd)
        except Exception:  # one bad command must not stop the loop serving the others
            log.exception("instance %s: applying %s failed", self.instance_id, type(cmd).__name__)

    def _write_ended(self, request_id: str) -> None:
        """From the thread that ended a prefill-side KV write: answer the decode instance
        at once, even mid-step (`on_write_ended` touches no engine state), and free the
        blocks at the next step boundary (`WriteEnded` in the inbox)."""

        def on_loop() -> None:
            task = asyncio.ensure_future(self.prefill.on_write_ended(request_id))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
            self.inbox.put_nowait(WriteEnded(request_id))

        assert self._event_loop is not None, "transfers start only while serving"
        self._event_loop.call_soon_threadsafe(on_loop)

    # -- handlers -------------------------------------------------------------------------

    async def _on_generate(self, cmd: GenerateCmd) -> None:
        try:
            request = cmd.request
            self.engine.add_request(
                cmd.request_id,
                list(request.prompt_token_ids),
                request.sampling,
                priority=request.priority,
                images=await self.images.inputs(request.images, self.engine.image_processor),
            )
        except ValueError as e:
            await self._send(error_delta(cmd.request_id, rejection(e)))

    async def _on_abort(self, cmd: AbortCmd) -> None:
        request_id = cmd.request_id
        if await self.decode.abort(request_id) or await self.prefill.abort(request_id):
            return
        seqs = self.engine.sequences.get(request_id, [])
        unfinished = [s.index for s in seqs if not s.is_finished]
        if self.engine.abort_request(request_id):
            for index in unfinished:
                await self._send(abort_delta(request_id, index))

    async def _on_set_role(self, cmd: SetRoleCmd) -> None:
        """Flip role without reloading anything (§3.2): requests already here finish in
        place; the scheduler sends new work by the new role. PD commands are served in
        either PD role (one placed just before the flip may still arrive)."""
        if cmd.role == self.role:
            return
        log.info("instance %s: role %s -> %s", self.instance_id, self.role, cmd.role)
        if cmd.role != "both":
            self.transport()
        self.role = cmd.role
        self.role_flips += 1

    async def _on_write_ended(self, msg: WriteEnded) -> None:
        await self.prefill.release(msg.request_id)

    async def _on_instance_lost(self, msg: InstanceLost) -> None:
        """A peer died (or restarted: `started_at` names the run that is gone): nothing it
        owed us will come, nothing we owe it can be delivered. Free what waits on it at once
        (the gateway resumes those requests elsewhere)."""
        await self.decode.on_instance_lost(msg.instance_id, msg.started_at)
        await self.prefill.on_instance_lost(msg.instance_id, msg.started_at)

    async def _on_snapshot_request(self, req: KvSnapshotRequest) -> None:
        if req.instance_id not in (None, self.instance_id):
            return
        num_blocks = await self.kv_events.snapshot(self.engine.block_manager, self.engine.tiers)
        log.info("instance %s: KV snapshot of %d blocks sent", self.instance_id, num_blocks)

    async def _fail_all(self, message: str) -> None:
        for request_id in list(self.engine.sequences):
            self.engine.abort_request(request_id)
            error = ErrorInfo(code=ErrorCode.INTERNAL, message=message)
            await self._send(error_delta(request_id, error))

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
        return build_heartbeat(
            instance_id=self.instance_id,
            started_at=self.started_at,
            role=self.role,
            model=self.model_name,
            engine=self.engine,
            role_flips=self.role_flips,
            transport=self._transport,
            images=self.images,
        )


def default_transport(config: InstanceConfig) -> OpenTransport:
    """The transport `--kv-transfer-backend` names (Mooncake: at `--kv-transfer-host`)."""
    return open_transport(config.kv_transfer_backend, config.kv_transfer_host)
