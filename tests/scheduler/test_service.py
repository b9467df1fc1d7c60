"""The scheduler service on a real nats-server, fed hand-made heartbeats: what it answers
a submit with (SLO admission) and what it makes of a restarted instance."""

from __future__ import annotations

import asyncio

import nats
import pytest

from services.scheduler.config import SchedulerConfig
from services.scheduler.service import SchedulerService
from tests.scheduler.beats import heartbeat
from xllm.protocol import (
    ClusterState,
    ClusterStateRequest,
    DecodeCmd,
    ErrorCode,
    GenerateCmd,
    InstanceExited,
    InstanceLost,
    RequestSpec,
    SamplingParams,
    SubmitReply,
    SubmitRequest,
    decode_as,
    encode,
    subjects,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


async def run_scheduler(nats_url: str, config: SchedulerConfig):
    nc = await nats.connect(nats_url)
    stop = asyncio.Event()
    task = asyncio.create_task(SchedulerService(config, nc).serve(stop))
    await asyncio.sleep(0.2)  # subscribed

    async def close():
        stop.set()
        await task
        await nc.close()

    return nc, close


def busy(started_at: float = 1.0):
    """An instance with 50 s of prefill queued (1 ms a token)."""
    return heartbeat(
        "i0", num_prefill_backlog_tokens=50_000, prefill_tokens=10_000, prefill_seconds=10.0,
        started_at=started_at,
    )  # fmt: skip


async def submit(nc, rid: str, priority: int = 0) -> SubmitReply:
    req = SubmitRequest(
        request_id=rid,
        request=RequestSpec(
            prompt_token_ids=list(range(100)),
            sampling=SamplingParams(max_tokens=4),
            priority=priority,
        ),
        arrival_time=0.0,
    )
    msg = await nc.request(subjects.SCHED_SUBMIT, encode(req), timeout=5)
    return decode_as(msg.data, SubmitReply)


async def test_slo_admission_refuses_online_work_only(nats_url):
    config = SchedulerConfig(policy="least-load", slo_ttft=2.0, slo_admission=1.5)
    nc, close = await run_scheduler(nats_url, config)
    try:
        cmds = []

        async def on_cmd(msg):
            cmds.append(msg)

        sub = await nc.subscribe(subjects.instance_cmd("i0"), cb=on_cmd)
        await nc.publish(subjects.HEARTBEAT, encode(busy()))
        await asyncio.sleep(0.3)
        online = await submit(nc, "online-1")
        offline = await submit(nc, "offline-1", priority=1)
        msg = await nc.request(subjects.CLUSTER_STATE, encode(ClusterStateRequest()), timeout=5)
        state = decode_as(msg.data, ClusterState)
        await asyncio.sleep(0.2)
        await sub.unsubscribe()
    finally:
        await close()
    assert online.error is not None and online.error.code == ErrorCode.OVERLOADED
    assert "beyond the 2s target" in online.error.message
    assert offline.instance_id == "i0"  # offline work has no TTFT target: it queues
    assert [decode_as(m.data, GenerateCmd).request_id for m in cmds] == ["offline-1"]
    assert (state.num_shed, state.num_rejected, state.num_submitted) == (1, 1, 1)


async def test_offline_work_decodes_on_its_prefill_instance_without_a_cost_model(nats_url):
    config = SchedulerConfig(policy="least-load", slo_tpot=0.1)
    nc, close = await run_scheduler(nats_url, config)
    try:
        cmds = {"p": [], "d": []}

        def on_cmd(instance_id):
            async def cb(msg):
                cmds[instance_id].append(msg)

            return cb

        subs = [await nc.subscribe(subjects.instance_cmd(i), cb=on_cmd(i)) for i in cmds]
        for instance_id, role in (("p", "prefill"), ("d", "decode")):
            await nc.publish(subjects.HEARTBEAT, encode(heartbeat(instance_id, role)))
        await asyncio.sleep(0.3)
        offline = await submit(nc, "offline-1", priority=1)
        online = await submit(nc, "online-1")
        await asyncio.sleep(0.2)
        for sub in subs:
            await sub.unsubscribe()
    finally:
        await close()
    assert (offline.instance_id, offline.prefill_instance_id) == ("p", None)
    assert (online.instance_id, online.prefill_instance_id) == ("d", "p")
    assert [decode_as(m.data, GenerateCmd).request_id for m in cmds["p"]] == ["offline-1"]
    assert [decode_as(m.data, DecodeCmd).request_id for m in cmds["d"]] == ["online-1"]


async def test_a_restarted_instance_is_announced_lost_at_once(nats_url):
    nc, close = await run_scheduler(nats_url, SchedulerConfig(policy="least-load"))
    try:
        lost = []

        async def on_lost(msg):
            lost.append(msg)

        sub = await nc.subscribe(subjects.INSTANCE_LOST, cb=on_lost)
        await nc.publish(subjects.HEARTBEAT, encode(heartbeat("i0", started_at=1.0)))
        await nc.publish(subjects.HEARTBEAT, encode(heartbeat("i0", started_at=1.0)))
        await nc.publish(subjects.HEARTBEAT, encode(heartbeat("i0", started_at=2.0)))
        await asyncio.sleep(0.3)
        await sub.unsubscribe()
    finally:
        await close()
    notices = [decode_as(m.data, InstanceLost) for m in lost]
    assert [(n.instance_id, n.started_at, n.reason) for n in notices] == [("i0", 1.0, "restarted")]


async def test_an_instance_whose_process_exited_is_announced_lost_at_once(nats_url):
    # A heartbeat timeout far beyond the test: only the supervisor's report can drop it.
    config = SchedulerConfig(policy="least-load", heartbeat_timeout=60.0)
    nc, close = await run_scheduler(nats_url, config)
    try:
        lost = []

        async def on_lost(msg):
            lost.append(decode_as(msg.data, InstanceLost))

        sub = await nc.subscribe(subjects.INSTANCE_LOST, cb=on_lost)
        for iid in ("i0", "i1"):
            await nc.publish(subjects.HEARTBEAT, encode(heartbeat(iid, started_at=100.0)))
        await nc.flush()
        await asyncio.sleep(0.1)
        # A report about a run older than the one serving (it restarted since) changes
        # nothing, nor does a malformed message; i0's report drops it.
        await nc.publish(subjects.INSTANCE_EXITED, b"not msgpack")
        stale = InstanceExited(instance_id="i1", returncode=-9, exited_at=50.0)
        await nc.publish(subjects.INSTANCE_EXITED, encode(stale))
        killed = InstanceExited(instance_id="i0", returncode=-9, exited_at=200.0)
        await nc.publish(subjects.INSTANCE_EXITED, encode(killed))
        # A heartbeat i0 sent before it died, arriving after the report: not a comeback.
        await nc.publish(subjects.HEARTBEAT, encode(heartbeat("i0", started_at=100.0)))
        await nc.flush()
        await asyncio.sleep(0.2)
        reply = await nc.request(subjects.CLUSTER_STATE, encode(ClusterStateRequest()), timeout=5)
        live = [hb.instance_id for hb in decode_as(reply.data, ClusterState).instances]
        placed = await submit(nc, "after-the-exit")
        # Its restart (a new run under the same id) serves again.
        await nc.publish(subjects.HEARTBEAT, encode(heartbeat("i0", started_at=300.0)))
        await nc.flush()
        await asyncio.sleep(0.1)
        reply = await nc.request(subjects.CLUSTER_STATE, encode(ClusterStateRequest()), timeout=5)
        live_after_restart = [
            hb.instance_id for hb in decode_as(reply.data, ClusterState).instances
        ]
        await sub.unsubscribe()
    finally:
        await close()
    assert [(n.instance_id, n.started_at, n.reason) for n in lost] == [
        ("i0", 100.0, "process exited (-9)")
    ]
    assert live == ["i1"] and placed.instance_id == "i1"
    assert sorted(live_after_restart) == ["i0", "i1"]
