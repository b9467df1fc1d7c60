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
"""scheduler → gateways and instances, publish (fan-out): `InstanceLost`, sent when an
instance misses its heartbeats, restarts, or its supervisor reports its process exited. Each gateway resumes the requests it had running there on
another instance; each instance frees blocks it held for a transfer with the lost one."""

INSTANCE_EXITED = "xllm.sched.instance_exited"
"""supervisor (`xllm up`) → scheduler, publish: `InstanceExited`, sent the moment a
supervised instance process exits (SIGKILL included). The scheduler drops the instance and
publishes `INSTANCE_LOST` at once, instead of after `heartbeat_timeout` of silence, which
stays the fallback where no supervisor watches (compose, other hosts). Malformed messages
are logged and dropped."""

SCHEDULER_QUEUE = "scheduler"
"""Queue group of the scheduler's subscriptions: with a standby scheduler subscribed,
each submit is still handled exactly once."""

# -- instances ----------------------------------------------------------------------------------


def instance_cmd(instance_id: str) -> str:
    """`xllm.inst.<id>.cmd` — scheduler (or gateway, for aborts) → one instance, publish:
    `GenerateCmd`, `AbortCmd`, `SetRoleCmd`. A command that fails is reported on the
    request's `request_output` subject (a `TokenDelta` with an error), not by a reply."""
    return f"xllm.inst.{token(instance_id)}.cmd"


def encoder_cmd(instance_id: str) -> str:
    """`xllm.enc.<id>.encode` — scheduler → one encoder instance, request/reply:
    `EncodeRequest` → `EncodeReply` (where each image's embeddings wait, for a Mooncake read)."""
    return f"xllm.enc.{token(instance_id)}.encode"


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
"""clients → JetStream stream `OFFLINE_STREAM` → offline workers (durable pull consumer
`OFFLINE_CONSUMER`, shared by every gateway), at-least-once. The payload is JSON, not
msgpack, so any language's NATS client can submit: the body of `POST /v1/completions` or
`/v1/chat/completions` plus `"endpoint"` naming which (and optionally `"custom_id"`). The
`Nats-Msg-Id` header is the job id (a subject token): JetStream drops a re-publish of it
within `OFFLINE_DUPLICATE_WINDOW`, and a job whose result is stored is never run again.
Offline jobs run at priority 1: online work goes first and preempts them."""

OFFLINE_STREAM = "XLLM_OFFLINE"
"""JetStream stream name (not a subject) that stores `OFFLINE_SUBMIT` durably (file)."""

OFFLINE_CONSUMER = "offline-workers"
"""JetStream durable consumer name (not a subject) the offline workers pull jobs with."""

OFFLINE_DUPLICATE_WINDOW = 24 * 3600.0
"""Seconds JetStream remembers a job id (`Nats-Msg-Id`) to drop re-publishes of it."""


def offline_result(job_id: str) -> str:
    """`xllm.offline.results.<job_id>` — offline worker → JetStream stream
    `OFFLINE_RESULTS_STREAM` → clients (read it with a consumer, or the stream's last
    message on the subject). JSON: `{"id", "job_id", "custom_id", "response":
    {"status_code", "request_id", "body"}, "error"}` — OpenAI Batch API's output line; `body`
    is what an HTTP client would get (the response, or `{"error": {...}}`); `error` is set
    only when the job itself was unusable (not JSON, unknown endpoint, failed too often).
    Exactly one per job: published with `Nats-Msg-Id` = job id, one message per subject."""
    return f"{OFFLINE_RESULTS_PREFIX}.{token(job_id)}"


OFFLINE_RESULTS_PREFIX = "xllm.offline.results"
"""offline workers → clients: the prefix of every `offline_result` subject (subscribe to
`OFFLINE_RESULTS_PREFIX + ".>"` for all of them)."""

OFFLINE_RESULTS_STREAM = "XLLM_OFFLINE_RESULTS"
"""JetStream stream name (not a subject) holding every `offline_result` (file storage)."""

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
