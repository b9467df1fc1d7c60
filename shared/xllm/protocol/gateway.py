"""gateway <-> scheduler: submitting a request, and reading the scheduler's cluster view.

Submit (`SCHED_SUBMIT`, request/reply with the gateway's deadline as the NATS timeout):
the gateway has already validated and tokenized the request and subscribed to
`request_output(request_id)`; the scheduler places it, sends the commands and replies with
the chosen instance, or with an error (e.g. NO_INSTANCE, OVERLOADED) and sends nothing.
Offline jobs are the same `SubmitRequest` with priority > 0: a gateway's offline worker
takes them from JetStream (`OFFLINE_SUBMIT`) and submits them like HTTP requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm.protocol.codec import message
from xllm.protocol.errors import ErrorInfo
from xllm.protocol.instance import Heartbeat
from xllm.protocol.types import RequestSpec


# v8: `request.images[].content_hash`, `.offset` (prefix hashes see images).
# v7: `request.images[].embedding` (an encoder made it). v6: `request.images`. v5: `request.sampling` beam search fields (use_beam_search, ...).
# v4: `request.sampling.structured` (a grammar). v3: prompt, sampling, priority and model
# moved into `request` (v2 is not read).
@message("submit", version=8, oldest=3)
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitRequest:
    """gateway → scheduler: place this request and start it."""

    request_id: str
    """Cluster-unique id chosen by the gateway; a valid subject token (`subjects.token`)."""
    request: RequestSpec
    """The prompt, how to sample it (validated by the gateway), its priority and model; the
    scheduler forwards it unchanged in the commands it sends."""
    arrival_time: float
    """Unix time (seconds) the gateway received the request; for queueing and SLO policies."""
    resumed: bool = False
    """A continuation of a request whose instance was lost: the prompt holds the original
    prompt plus the tokens already streamed to the client."""


@message("submit_reply", version=2)
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitReply:
    """scheduler → gateway: where the request went, or why it went nowhere."""

    request_id: str
    """Echoes `SubmitRequest.request_id`."""
    instance_id: str | None = None
    """The instance that streams the output (aborts go to its command subject)."""
    prefill_instance_id: str | None = None
    """PD-disaggregated: the instance that prefills and streams the first token (aborts go
    to it too); None = colocated."""
    error: ErrorInfo | None = None
    """Why the request was not placed; then nothing was started."""

    def __post_init__(self) -> None:
        if (self.instance_id is None) == (self.error is None):
            raise ValueError("SubmitReply needs exactly one of instance_id and error")


@message("cluster_state_request", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterStateRequest:
    """gateway → scheduler (`CLUSTER_STATE`, request/reply): send me your view of the cluster."""


# v4: its heartbeats nest their stats (Heartbeat v6); v3 is not read. v5: Heartbeat v7.
# v6: Heartbeat v8. v7: Heartbeat v9.
@message("cluster_state", version=7, oldest=4)
@dataclass(frozen=True, slots=True, kw_only=True)
class ClusterState:
    """scheduler → gateway: every live instance's last heartbeat and the scheduler's counters."""

    instances: list[Heartbeat]
    """The latest heartbeat of each instance the scheduler considers alive."""
    policy: str
    """The active placement policy's name."""
    num_submitted: int
    """Requests placed since the scheduler started."""
    num_rejected: int
    """Submits answered with an error since the scheduler started."""
    num_shed: int = 0
    """Of those, online requests refused by SLO admission (TTFT target out of reach)."""
    num_redispatched: int
    """Requests re-placed after their instance failed."""
    sent_at: float
    """Unix time (seconds) the snapshot was taken."""
    role_counts: dict[str, int] = field(default_factory=dict)
    """Live instances per role as the scheduler places by them ("prefill", "decode",
    "both"): a flip counts from the moment it is ordered."""
    num_role_flips: int = 0
    """Role flips the scheduler ordered since it started (`SetRoleCmd`s sent); each
    instance's `Heartbeat.role_flips` counts the ones it carried out."""


@message("instance_lost", version=2)
@dataclass(frozen=True, slots=True, kw_only=True)
class InstanceLost:
    """scheduler → gateways (`INSTANCE_LOST`): an instance fell silent and left the rotation;
    whatever it was running is gone with it."""

    instance_id: str
    """The instance that was lost."""
    reason: str = "missed heartbeats"
    """Why the scheduler gave up on it, for logs."""
    started_at: float = 0.0
    """Which run of it was lost (its `Heartbeat.started_at`; 0 = unknown): a later run under
    the same id is a new peer."""
