"""Messages to and from an instance: commands on `instance_cmd(id)`, and its `Heartbeat`.

Commands are published (no reply). An instance's NATS callback decodes a command and queues
it; the engine loop applies queued commands between steps (STYLE lesson 4), so a command
takes effect at the next step boundary, never mid-step. A command the instance cannot carry
out for a request (bad parameters, context too long) is answered on that request's
`request_output` subject with a `TokenDelta` whose finish_reason is "error".

NOTE: KV-transfer commands (PD disaggregation: reserve blocks on the decode instance, push a
prefill's KV blocks to it, migrate a running request) belong here too and will be added by
the KV-transfer issue as their own tagged messages, e.g. `PrefillCmd` / `DecodeCmd` carrying
the peer's transfer endpoint and block ids. `GenerateCmd` stays the PD-colocated path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from xllm.protocol.codec import message
from xllm.protocol.sampling import SamplingSpec

Role = Literal["prefill", "decode", "both"]
"""An instance's role: prefill only, decode only, or both (PD-colocated, the default)."""


@message("generate", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateCmd:
    """scheduler → instance: run a request from prompt to finish and stream its tokens on
    `request_output(request_id)`."""

    request_id: str
    """Cluster-unique id, chosen by the gateway; also the token of the output subject."""
    prompt_token_ids: list[int]
    """The tokenized prompt (chat template applied)."""
    sampling: SamplingSpec
    """How to sample; validated by the instance against its model."""
    priority: int = 0
    """0 = online; > 0 = offline / best-effort, preempted first (larger = less urgent)."""


@message("abort", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class AbortCmd:
    """gateway or scheduler → instance: stop a request (client gone, deadline passed). The
    instance frees its blocks and ends each completion with finish_reason "abort"; an
    unknown request id is ignored (the request may have finished already)."""

    request_id: str
    """The request to stop, all of its `n` completions."""


@message("set_role", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class SetRoleCmd:
    """scheduler → instance: switch role without reloading weights (report §3.2). Requests
    already running finish in the old role; new commands are accepted per the new role."""

    role: Role
    """The role to take from the next step on."""


@message("heartbeat", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """instance → scheduler, kvstore, gateway (`HEARTBEAT`): a load snapshot, published
    periodically. Counters (`prefix_*`, `num_preemptions`, `steps`) are cumulative since the
    instance started, so a lost heartbeat loses nothing; rates are differences."""

    instance_id: str
    """Cluster-unique id; the token of the instance's command subject."""
    role: Role
    """The instance's current role."""
    model: str
    """The served model's name (what clients put in `model`)."""
    max_model_len: int
    """Context length: prompt plus output tokens must fit."""
    num_running: int
    """Sequences in the running batch."""
    num_waiting: int
    """Sequences queued, not yet admitted."""
    num_tokens_in_flight: int
    """Tokens of all running and waiting sequences (prompt + output so far); the load."""
    kv_blocks_used: int
    """KV blocks held by sequences."""
    kv_blocks_free: int
    """KV blocks free, including cached prefix blocks that may be evicted."""
    kv_block_size: int
    """Tokens per KV block; prefix block hashes are computed with this size."""
    prefix_queried_tokens: int
    """Cumulative prompt tokens looked up in the prefix cache."""
    prefix_hit_tokens: int
    """Cumulative prompt tokens found in the prefix cache."""
    num_preemptions: int
    """Cumulative sequences preempted (recomputed later) for lack of KV blocks."""
    steps: int
    """Cumulative engine steps."""
    sent_at: float
    """Unix time (seconds) when this heartbeat was sent."""
    kv_transfer_endpoint: str | None = None
    """Where peers reach this instance's KV transfer engine (host:port); None = no transfer."""
