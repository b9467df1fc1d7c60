"""An instance's statistics, grouped as its `Heartbeat` carries them, each group one plain value.

    load         LoadStats         the queues now: what placement balances
    kv           KvCacheStats      the KV pool and prefix cache
    steps        StepStats         what the engine's steps cost (the SLO policy fits from it)
    preemption   PreemptionStats   sequences pushed out for lack of blocks: recomputed or swapped
    speculation  SpeculationStats  speculative decoding's drafts and its adaptive switch
    transfer     KvTransferStats   KV blocks moved between instances (PD disaggregation)
    tiers        KvTierStats       the KV tiers behind the pool: host memory, disk, the store
    experts      ExpertStats       MoE models: tokens per expert copy, and re-placements (EPLB)
    encoder      EncoderStats      an encoder instance's batches, embedding cache, bytes

The engine fills these types itself (they are its counters, not copies of them), so a field
is defined and documented once, here. Gauges describe the instance now; counters
(`prefix_*`, `num_preemptions`, `prefill_*`, ...) are cumulative since it started, so a lost
heartbeat loses nothing and rates are differences or ratios. Every field has a default (an
idle instance), so a test or simulator sets only the ones it cares about.

Versioned by the messages that carry them (`Heartbeat`, `ClusterState`): a change to a field
here is a version bump there.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True, kw_only=True)
class LoadStats:
    """The instance's queues at the moment of the heartbeat."""

    num_running: int = 0
    """Sequences in the running batch."""
    num_waiting: int = 0
    """Sequences queued, not yet admitted."""
    num_tokens_in_flight: int = 0
    """Tokens of all running and waiting sequences (prompt + output so far), less the prompt
    tokens they took from the prefix cache; the load."""
    num_prefill_backlog_tokens: int = 0
    """Tokens not yet computed of the sequences still prefilling (waiting, or running short
    of their last token): the prefill queue a new prompt waits behind."""
    num_offline_prefill_backlog_tokens: int = 0
    """Of `num_prefill_backlog_tokens`, the offline sequences' (priority > 0): the engine
    prefills online prompts first, so they do not wait behind these."""
    num_decoding: int = 0
    """Running sequences past their prompt, decoding (after a decode → prefill flip, the
    ones finishing in place)."""
    num_reserved: int = 0
    """Decode side: sequences holding blocks for a prompt another instance prefills, not
    yet in the queues (they decode here once their KV lands)."""
    num_reserved_tokens: int = 0
    """The prompt tokens of those sequences."""


@dataclass(slots=True, kw_only=True)
class KvCacheStats:
    """The KV block pool and its prefix cache (block size: `Heartbeat.kv_block_size`)."""

    blocks_used: int = 0
    """KV blocks held by sequences."""
    blocks_free: int = 0
    """KV blocks free, including cached prefix blocks that may be evicted."""
    prefix_queried_tokens: int = 0
    """Cumulative prompt tokens looked up in the prefix cache."""
    prefix_hit_tokens: int = 0
    """Cumulative prompt tokens found in the prefix cache."""


@dataclass(slots=True, kw_only=True)
class StepStats:
    """What the engine's steps cost, counted by `xllm.engine.step_stats` (see its module
    doc for how a step's time is split). Cumulative but for the `recent_*` values, which
    a rate over the last few steps needs and one heartbeat cannot rebuild."""

    num_steps: int = 0
    """Cumulative engine steps that ran a forward pass (including the first, whose one-time
    costs the counters below leave out)."""
    prefill_tokens: int = 0
    """Cumulative tokens computed by prefill (prompt chunks and recomputes), not decodes."""
    prefill_seconds: float = 0.0
    """Cumulative step time charged to those tokens (a mixed step is split by token share)."""
    recent_prefill_seconds_per_token: float = 0.0
    """Prefill time per token over roughly the last 8k prefill tokens (each step weighted by
    its tokens); 0 before the first prefill. What the TTFT predictor fits from."""
    decode_steps: int = 0
    """Cumulative steps that ran at least one decode."""
    decode_seconds: float = 0.0
    """Cumulative wall time of those steps (mean TPOT = this / decode_steps)."""
    recent_tpot: float = 0.0
    """Exponentially weighted mean wall time of the recent decode steps, in seconds: each
    running decode gets one token per step, so this is the time per output token they see
    now; 0 before the first decode."""
    busy_seconds: float = 0.0
    """Cumulative wall time of the steps that computed something: the busy fraction over an
    interval is its difference over the interval's length."""
    ttft_count: int = 0
    """Cumulative first tokens sampled here (prompts this instance prefilled)."""
    ttft_seconds: float = 0.0
    """Cumulative seconds from a request's arrival at this instance to its first token
    (queueing + prefill)."""
    scheduler_seconds: float = 0.0
    """Cumulative CPU-side step work outside the forward pass: scheduling, building the
    input tensors (with --async-scheduling) and turning samples into outputs."""
    hidden_scheduler_seconds: float = 0.0
    """Of `scheduler_seconds`, the part that ran while a forward pass was running (hidden
    behind it by --async-scheduling; 0 without it)."""


@dataclass(slots=True, kw_only=True)
class PreemptionStats:
    """Sequences pushed out of the running batch for lack of KV blocks: online ones drop
    their KV and recompute it later; offline ones may keep it, swapped to host memory."""

    num_preemptions: int = 0
    """Cumulative sequences preempted (recomputed later) for lack of KV blocks."""
    num_swapped: int = 0
    """Offline sequences preempted with their KV swapped to host memory, waiting for room."""
    num_swap_outs: int = 0
    """Cumulative preemptions of offline sequences that kept their KV (swapped out)."""
    swap_out_blocks: int = 0
    """Cumulative KV blocks copied to host memory by those preemptions."""
    swap_in_blocks: int = 0
    """Cumulative KV blocks copied back when swapped sequences resumed."""
    swap_seconds: float = 0.0
    """Cumulative seconds spent on those copies, both ways."""


@dataclass(slots=True, kw_only=True)
class SpeculationStats:
    """Speculative decoding (`--speculative`); all zero / False without it."""

    num_draft_tokens: int = 0
    """Cumulative speculative draft tokens verified."""
    num_accepted_draft_tokens: int = 0
    """Cumulative drafts the verification kept (acceptance = this / num_draft_tokens)."""
    recent_acceptance_rate: float = 0.0
    """Kept / verified drafts over the recent speculative steps, what the adaptive switch
    decides from; 0 before any."""
    speculating: bool = False
    """Whether the instance's last step speculated (the adaptive switch's current choice)."""
    method: str = ""
    """Where the drafts come from (`--speculative`: ngram, suffix, draft); "" when off."""


@dataclass(slots=True, kw_only=True)
class KvTransferStats:
    """KV blocks moved between instances: the transport's own counters (`xllm.kv_transfer`
    counts them); all zero before a transport opened (`Heartbeat.kv_transfer_endpoint` None)."""

    blocks_sent: int = 0
    """Cumulative KV blocks this instance wrote into decode instances (prefill role)."""
    bytes_sent: int = 0
    """Cumulative bytes of those blocks."""
    writes: int = 0
    """Cumulative contiguous segments written for them (after merging consecutive blocks)."""
    transfers: int = 0
    """Cumulative requests whose KV this instance sent."""
    seconds_sending: float = 0.0
    """Cumulative wall time inside those writes (mean latency = this / transfers)."""
    blocks_received: int = 0
    """Cumulative KV blocks prefill instances wrote into this one (decode role), as their
    `KvReady`s said (the receiver cannot observe one-sided writes)."""
    bytes_received: int = 0
    """Cumulative bytes of those blocks."""


@dataclass(slots=True, kw_only=True)
class KvTierCounters:
    """One KV tier's counters (`xllm.engine.kv_tiers` counts them), cumulative."""

    hits: int = 0
    """Blocks loaded to the device from this tier instead of recomputed."""
    bytes_loaded: int = 0
    """Their bytes."""
    num_loads: int = 0
    """Loads whose slowest tier was this one (one per request that waited for a load)."""
    load_seconds: float = 0.0
    """Wall time of those loads (mean load latency = this / num_loads)."""
    failed_loads: int = 0
    """Loads that failed (the request recomputed instead), by their slowest tier."""
    blocks_stored: int = 0
    """Blocks written into this tier (store: puts that succeeded)."""
    blocks_evicted: int = 0
    """Blocks this tier dropped (host: spilled to disk or gone; store: blocks this instance
    put that an audit found gone, evicted by the store or lost with its master)."""
    replica_reads: int = 0
    """Store: blocks read replica by replica after Mooncake's `get` (its first replica)
    failed, as when that replica's client died with its segment."""


@dataclass(slots=True, kw_only=True)
class KvTierStats:
    """The KV tiers behind the device pool; all zero when none is configured."""

    host: KvTierCounters = field(default_factory=KvTierCounters)
    disk: KvTierCounters = field(default_factory=KvTierCounters)
    store: KvTierCounters = field(default_factory=KvTierCounters)


@dataclass(slots=True, kw_only=True)
class ExpertStats:
    """MoE models' expert load and its balancing (`xllm.engine.expert_balancer` counts it);
    all zero for dense models. Imbalance is max / mean tokens per expert copy in a layer,
    averaged over the MoE layers: 1.0 is perfectly even."""

    num_moe_layers: int = 0
    """Decoder layers with routed experts."""
    num_experts: int = 0
    """Logical (checkpoint) experts per MoE layer."""
    num_slots: int = 0
    """Physical expert copies per MoE layer (experts + redundant copies), over all ranks."""
    tokens_routed: int = 0
    """Cumulative (token, expert) pairs computed, summed over the MoE layers."""
    imbalance: float = 0.0
    """Imbalance of the tokens computed since the current placement went in (1.0 before
    any)."""
    recent_imbalance: float = 0.0
    """Imbalance over the last completed balancing window (see `eplb_interval`); 0 before one."""
    recent_rank_imbalance: float = 0.0
    """The same over expert-parallel ranks (max / mean tokens per rank); 1.0 on one rank."""
    num_rebalances: int = 0
    """Cumulative re-placements switched in (new expert copies, double-buffered)."""
    imbalance_before_rebalance: float = 0.0
    """`imbalance` of the placement the last re-placement replaced, at the switch; 0 before
    one."""
    predicted_imbalance: float = 0.0
    """What that re-placement expected the same load to give (the policy's estimate)."""


@dataclass(slots=True, kw_only=True)
class EncoderStats:
    """An encoder instance (`services.encoder`, or an instance's encode endpoint): cumulative
    since it started. On an instance that runs prompts: the embeddings it read, and its
    engine's own tower calls in `batches`, `images_encoded` and `encode_seconds`."""

    batches: int = 0
    """Vision-tower calls (each encodes up to `--max-batch-images` images)."""
    images_encoded: int = 0
    """Images the tower ran on (cache misses)."""
    encode_seconds: float = 0.0
    """Time spent in the tower; `encode_seconds / batches` is the encode latency."""
    cache_queries: int = 0
    """Images asked for."""
    cache_hits: int = 0
    """Of those, found in the embedding cache (not encoded again)."""
    cache_bytes: int = 0
    """Gauge: bytes of embeddings the cache holds now."""
    bytes_published: int = 0
    """Bytes of embeddings handed out for readers to fetch through Mooncake (one image's
    bytes per reply that names it); the readers count what they fetched."""
    bytes_fetched: int = 0
    """On an instance that runs prompts: bytes of embeddings it read from encoders."""
    images_fetched: int = 0
    """On an instance that runs prompts: images whose embeddings it read from encoders."""
    fetch_failures: int = 0
    """On an instance that runs prompts: images whose embeddings it could not read (the
    encoder was gone), encoded here from the file instead."""
