"""KV cache metadata: instances report their blocks to the kvstore; the scheduler asks it
which instance holds the longest prefix of a request.

A block is named by its chained hash (`xllm.engine.prefix_hash`): block i's hash covers the
whole prefix of tokens [0, (i+1) * block_size), so a prefix match is "how many leading
hashes of the chain does this instance hold". Hashes are 63-bit ints.

Events are deltas. NATS publishes are at-most-once, so each instance numbers its `KvEvents`
messages (`seq`, +1 per message); a kvstore that sees a gap, or that just started, publishes
a `KvSnapshotRequest` and the instance re-publishes every block it holds, the first message
with `reset=True` (drop all you know about me, then apply these).

Each tier holding a copy of a block is reported on its own: an instance's tiers are
inclusive (a block cached on the device is also in host memory), so one block is usually
"stored" in several. A block moving between tiers (host -> disk) is two events: "stored" in
the new tier and "evicted" from the old one, in either order. The index keeps, per instance
and block, the set of tiers holding it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from xllm.protocol.codec import message

KvEventKind = Literal["stored", "evicted"]
"""What happened to a block in a tier."""

KvTier = Literal["device", "host", "disk", "store"]
"""Where a copy of a block is, fastest first: accelerator memory, host memory, local disk,
the cluster's shared store (Mooncake Store)."""


class KvEvent(NamedTuple):
    """One block event; sent as a 3-element array (events are many and small)."""

    kind: KvEventKind
    """"stored": the block's KV is now present in `tier`; "evicted": it no longer is."""
    block_hash: int
    """The block's chained prefix hash."""
    tier: KvTier
    """Where the copy is."""


@message("kv_events", version=2)
@dataclass(frozen=True, slots=True, kw_only=True)
class KvEvents:
    """instance → kvstore (`KV_EVENTS`): blocks stored and evicted since the last message."""

    instance_id: str
    """The instance the blocks live on."""
    events: list[KvEvent]
    """In the order they happened (a block may be stored and evicted in one message)."""
    seq: int = 0
    """Per-instance message counter, +1 per message; a gap means lost events."""
    reset: bool = False
    """True on the first message of a snapshot: forget this instance's blocks first."""


@message("kv_snapshot_request", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class KvSnapshotRequest:
    """kvstore → instances (`KV_SNAPSHOT_REQUEST`): re-publish all your blocks."""

    instance_id: str | None = None
    """The instance that should answer; None = every instance."""


@message("kv_match", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class KvMatchRequest:
    """scheduler → kvstore (`KV_MATCH`, request/reply): who holds how much of this prefix?"""

    block_hashes: list[int]
    """The request's prefix hash chain, block 0 first."""
    instance_ids: list[str] = field(default_factory=list)
    """Only answer for these instances (the placement candidates); empty = every instance."""


@message("kv_match_reply", version=2)
@dataclass(frozen=True, slots=True, kw_only=True)
class KvMatchReply:
    """kvstore → scheduler: the matched prefix length per instance."""

    matched_blocks: dict[str, int]
    """instance_id -> number of leading blocks of the chain held (in any tier); instances
    that hold none may be left out."""
    matched_tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    """instance_id -> {tier: how many of its `matched_blocks` have their fastest copy
    there}, tiers with none left out (v2; empty from a v1 kvstore)."""
    store_blocks: int = 0
    """Leading blocks of the chain in the cluster store, which any instance can fetch (v2)."""
