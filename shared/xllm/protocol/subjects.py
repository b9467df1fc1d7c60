"""Every NATS subject, queue group and JetStream name xLLM uses, each defined once.

Call sites use these names, never f-strings: `subjects.instance_cmd(iid)`, not
`f"xllm.inst.{iid}.cmd"`. Each definition's docstring says who sends, who receives, the
kind (publish = fire-and-forget fan-out, request/reply, queue group = one of N handles it)
and the message types it carries (from this package).

Subjects built from ids go through `token()`: NATS splits subjects on `.`, treats `*` and
`>` as wildcards and forbids whitespace, so an id holding one of those would silently
address the wrong subscribers. `token()` raises ValueError instead.
"""

from __future__ import annotations

import re

# -- gateway <-> scheduler --------------------------------------------------------------------

SCHED_SUBMIT = "xllm.sched.submit"
"""gateway → scheduler, request/reply: `SubmitRequest` → `SubmitReply`. The scheduler
subscribes in queue group `SCHEDULER_QUEUE`. The gateway subscribes to
`request_output(rid)` *before* submitting, so no token can be missed."""

CLUSTER_STATE = "xllm.sched.cluster"
"""gateway → scheduler, request/reply: `ClusterStateRequest` → `ClusterState`, the
scheduler's view of every instance (serves the gateway's /cluster). Queue group
`SCHEDULER_QUEUE`."""

INSTANCE_LOST = "xllm.sched.instance_lost"
"""scheduler → gateways, publish (fan-out): `InstanceLost`, sent when an instance misses its
heartbeats. Each gateway resumes the requests it had running there on another instance."""

SCHEDULER_QUEUE = "scheduler"
"""Queue group of the scheduler's subscriptions: with a standby scheduler subscribed,
each submit is still handled exactly once."""

# -- instances ----------------------------------------------------------------------------------


def instance_cmd(instance_id: str) -> str:
    """`xllm.inst.<id>.cmd` — scheduler (or gateway, for aborts) → one instance, publish:
    `GenerateCmd`, `AbortCmd`, `SetRoleCmd`. A command that fails is reported on the
    request's `request_output` subject (a `TokenDelta` with an error), not by a reply."""
    return f"xllm.inst.{token(instance_id)}.cmd"


HEARTBEAT = "xllm.inst.heartbeat"
"""instance → scheduler, kvstore, gateway, publish (fan-out, no queue group): `Heartbeat`,
every instance's load snapshot, sent periodically. A missing heartbeat is how the scheduler
notices a dead instance."""


def request_output(request_id: str) -> str:
    """`xllm.req.<rid>.out` — instance → gateway, publish: `TokenDelta`, one per request
    (per completion index) per engine step, carrying only the new tokens; the last one has a
    finish_reason. The gateway that submitted the request is the only subscriber."""
    return f"xllm.req.{token(request_id)}.out"


# -- KV cache metadata (kvstore) ----------------------------------------------------------------

KV_EVENTS = "xllm.kv.events"
"""instance → kvstore, publish: `KvEvents` (blocks stored in / evicted from a tier). The
kvstore subscribes in queue group `KVSTORE_QUEUE`; events carry a per-instance `seq` so a
gap (a lost message) is detectable and answered with `KV_SNAPSHOT_REQUEST`."""

KV_MATCH = "xllm.kv.match"
"""scheduler → kvstore, request/reply: `KvMatchRequest` → `KvMatchReply`, how many leading
blocks of a prefix hash chain each instance holds. Queue group `KVSTORE_QUEUE`."""

KV_SNAPSHOT_REQUEST = "xllm.kv.snapshot"
"""kvstore → instances, publish (fan-out, no queue group): `KvSnapshotRequest`; the named
instance (or every instance) re-publishes all its blocks on `KV_EVENTS`, the first message
with `reset=True`. Sent when the kvstore starts or sees a gap in an instance's `seq`."""

KVSTORE_QUEUE = "kvstore"
"""Queue group of the kvstore's subscriptions: replicas are stateless over Redis, so any
one may handle a message."""

# -- offline jobs (JetStream) -------------------------------------------------------------------

OFFLINE_SUBMIT = "xllm.offline.submit"
"""clients → JetStream stream `OFFLINE_STREAM` → scheduler (durable consumer
`OFFLINE_CONSUMER`), at-least-once: `SubmitRequest` with priority > 0. Offline work is
best-effort and preempted by online work."""

OFFLINE_STREAM = "XLLM_OFFLINE"
"""JetStream stream name (not a subject) that stores `OFFLINE_SUBMIT` durably."""

OFFLINE_CONSUMER = "scheduler"
"""JetStream durable consumer name (not a subject) the scheduler pulls offline jobs with."""

# -- subject tokens -----------------------------------------------------------------------------

# Separators and wildcards, plus any whitespace or control character.
_BAD_TOKEN_CHAR = re.compile(r"[.*>\s\x00-\x1f\x7f]")


def token(value: str) -> str:
    """Return `value` if it can be one token of a NATS subject, else raise ValueError."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"subject token must be a non-empty string, got {value!r}")
    bad = _BAD_TOKEN_CHAR.search(value)
    if bad:
        raise ValueError(
            f"subject token {value!r} contains {bad.group()!r}; ids used in NATS subjects "
            "must not contain '.', '*', '>', whitespace or control characters"
        )
    return value
