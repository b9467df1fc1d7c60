"""Messages to and from an instance: commands on `instance_cmd(id)`, and its `Heartbeat`.

Commands are published (no reply). An instance's NATS callback decodes a command and queues
it; the engine loop applies queued commands between steps (STYLE lesson 4), so a command
takes effect at the next step boundary, never mid-step. A command the instance cannot carry
out for a request (bad parameters, context too long) is answered on that request's
`request_output` subject with a `TokenDelta` whose finish_reason is "error".

PD disaggregation (report §3.2) is three messages, in this order:

    scheduler ──DecodeCmd──► decode instance D      D reserves blocks for the whole prompt
    D ──PrefillCmd──► prefill instance P            (its own prefix cache counted), then asks
                                                    P, naming its blocks and Mooncake peer
    P: prefill, first token → the client's stream; KV blocks written into D's (Mooncake)
    P ──KvReady──► D                                D decodes from the first token on

`GenerateCmd` stays the PD-colocated path (role both): nothing is transferred.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from xllm.protocol.codec import message
from xllm.protocol.errors import ErrorInfo
from xllm.protocol.kv_peer import KvPeer
from xllm.protocol.stats import (
    EncoderStats,
    ExpertStats,
    KvCacheStats,
    KvTierStats,
    KvTransferStats,
    LoadStats,
    PreemptionStats,
    SpeculationStats,
    StepStats,
)
from xllm.protocol.types import Logprob, RequestSpec, Role


# v7: `request.images[].content_hash`, `.offset`.
# v6: `request.images[].embedding`. v5: `request.images`. v4: `request.sampling` beam search fields (use_beam_search, ...).
# v3: `request.sampling.structured` (a grammar). v2: prompt, sampling and priority moved
# into `request` (v1 is not read).
@message("generate", version=7, oldest=2)
@dataclass(frozen=True, slots=True, kw_only=True)
class GenerateCmd:
    """scheduler → instance: run a request from prompt to finish and stream its tokens on
    `request_output(request_id)`."""

    request_id: str
    """Cluster-unique id, chosen by the gateway; also the token of the output subject."""
    request: RequestSpec
    """The prompt and how to sample it; checked again by the instance against its model."""


# v8: `request.images[].content_hash`, `.offset`.
# v7: `request.images[].embedding`. v6: `request.images`. v5: `request.sampling` beam search fields (use_beam_search, ...).
# v4: `request.sampling.structured` (a grammar). v3: prompt, sampling and priority moved
# into `request` (v2 is not read).
@message("decode", version=8, oldest=3)
@dataclass(frozen=True, slots=True, kw_only=True)
class DecodeCmd:
    """scheduler → decode instance: decode a request that `prefill_instance_id` prefills.
    The decode instance reserves the prompt's blocks (waiting for room if it must), then
    sends the prefill instance a `PrefillCmd`."""

    request_id: str
    """Cluster-unique id, chosen by the gateway; also the token of the output subject."""
    request: RequestSpec
    """The prompt and how to sample it; checked by both instances against their model
    (`sampling.n` must be 1)."""
    prefill_instance_id: str
    """The instance that computes the prompt's KV and the first token."""
    prefill_started_at: float = 0.0
    """That instance's `Heartbeat.started_at` as the scheduler last saw it (0 = unknown):
    which run of it is meant, so a restart under the same id is not mistaken for the lost
    run (`InstanceLost.started_at`)."""


# v9: `request.images[].content_hash`, `.offset`.
# v8: `request.images[].embedding`. v7: `request.images`. v6: `request.sampling` beam search fields (use_beam_search, ...).
# v5: `request.sampling.structured` (a grammar). v4: the KV peer's layout nested (v3);
# prompt, sampling and priority moved into `request`.
@message("prefill", version=9, oldest=4)
@dataclass(frozen=True, slots=True, kw_only=True)
class PrefillCmd:
    """decode instance → prefill instance: prefill this prompt, stream the first token to the
    client, write the prompt's KV into `fill_block_ids` of `peer`, then send `KvReady` to
    `decode_instance_id`."""

    request_id: str
    """The request; the prefill instance streams its first token on its output subject."""
    request: RequestSpec
    """The prompt and how to sample its first token, as the `DecodeCmd` carried them."""
    decode_instance_id: str
    """Where `KvReady` goes."""
    decode_started_at: float = 0.0
    """The decode instance's `Heartbeat.started_at` (which run of it sent this)."""
    peer: KvPeer
    """Where the KV goes: the decode instance's pool and its layout."""
    num_cached_tokens: int
    """Leading prompt tokens the decode instance has cached already (whole blocks): their
    blocks are not sent."""
    fill_block_ids: list[int]
    """The decode instance's blocks for the rest of the prompt, in order (the last one
    possibly partial)."""


@message("kv_ready", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class KvReady:
    """prefill instance → decode instance: the prompt's KV is in your blocks (or, with
    `error`, it will never be; with `finished`, the first token ended the request and
    nothing was sent). The decode instance then decodes, fails, or frees the reservation."""

    request_id: str
    """The request whose blocks were written."""
    first_token_id: int = -1
    """The token the prefill instance sampled (and already streamed)."""
    first_logprob: Logprob | None = None
    """Its logprob entry, when logprobs were asked for."""
    num_blocks: int = 0
    """Blocks written."""
    finished: bool = False
    """The prefill instance already sent the request's final delta."""
    error: ErrorInfo | None = None
    """Why the KV could not be delivered; the decode instance fails the request."""


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
    already here finish in place (a decode instance turned prefill keeps decoding its running
    requests, and vice versa). The role is what the scheduler places by; the instance serves
    whatever command reaches it in either PD role, so a `DecodeCmd` or `PrefillCmd` sent just
    before the flip still completes there."""

    role: Role
    """The role to take from the next step on."""


# v6: the stats nested in groups (`load`, `kv`, `steps`, ...: see stats.py); v5 is not read.
# v7: `tiers`, `kv_block_bytes`, `max_num_batched_tokens`, `max_num_seqs`, `experts`.
# v8: `encoder`. v9: `tiers.*.replica_reads`.
# v10: `steps.scheduler_seconds`, `steps.hidden_scheduler_seconds`.
@message("heartbeat", version=10, oldest=6)
@dataclass(frozen=True, slots=True, kw_only=True)
class Heartbeat:
    """instance → scheduler, kvstore, gateway (`HEARTBEAT`): a load snapshot, published
    periodically: who the instance is, then its statistics in the groups of stats.py
    (counters there are cumulative since `started_at`, so a lost heartbeat loses nothing)."""

    instance_id: str
    """Cluster-unique id; the token of the instance's command subject."""
    started_at: float = 0.0
    """Unix time this run of the instance started: a new value under a known id means the
    instance restarted and whatever the old run held is gone."""
    role: Role
    """The instance's current role."""
    model: str
    """The served model's name (what clients put in `model`)."""
    max_model_len: int
    """Context length: prompt plus output tokens must fit."""
    kv_block_size: int
    """Tokens per KV block; prefix block hashes are computed with this size."""
    kv_block_bytes: int = 0
    """Bytes of one KV block, every layer (what loading it from a slower tier moves; v7)."""
    max_num_batched_tokens: int = 0
    """Tokens one engine step computes at most (its prefill chunk budget): what slo-pd's
    pre-analysis puts beside a decode on this instance; 0 = unknown."""
    max_num_seqs: int = 0
    """Sequences one engine step runs at most: the batch limit of that pre-analysis; 0 =
    unknown (no limit assumed)."""
    kv_transfer_endpoint: str | None = None
    """Where peers reach this instance's KV transfer engine (host:port); None = no transfer."""
    sent_at: float
    """Unix time (seconds) when this heartbeat was sent."""
    role_flips: int = 0
    """Cumulative role changes (`SetRoleCmd`s that changed the role)."""
    load: LoadStats = field(default_factory=LoadStats)
    """The queues: what placement balances."""
    kv: KvCacheStats = field(default_factory=KvCacheStats)
    """The KV pool and prefix cache."""
    steps: StepStats = field(default_factory=StepStats)
    """What the engine's steps cost."""
    preemption: PreemptionStats = field(default_factory=PreemptionStats)
    """Sequences preempted for lack of blocks, recomputed or swapped."""
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    """Speculative decoding's drafts and switch."""
    transfer: KvTransferStats = field(default_factory=KvTransferStats)
    """KV moved to and from other instances."""
    tiers: KvTierStats = field(default_factory=KvTierStats)
    """The host, disk and store KV tiers (v7)."""
    experts: ExpertStats = field(default_factory=ExpertStats)
    """MoE models: tokens per expert copy and re-placements (added in version 7)."""
    encoder: EncoderStats = field(default_factory=EncoderStats)
    """An encoder instance's batches, cache and bytes handed out (v8; idle elsewhere)."""
