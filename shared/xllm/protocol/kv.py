"""KV cache metadata: instances report their blocks to the kvstore; the scheduler asks it
which instance holds the longest prefix of a request.

A block is named by its chained hash (`xllm.engine.prefix_hash`): block i's hash covers the
whole prefix of tokens [0, (i+1) * block_size), so a prefix match is "how many leading
hashes of the chain does this instance hold". Hashes are 63-bit ints.

Events are deltas. NATS publishes are at-most-once, so each instance numbers its `KvEvents`
messages (`seq`, +1 per message); a kvstore that sees a gap, or that just started, publishes
a `KvSnapshotRequest` and the instance re-publishes every block it holds, the first message
with `reset=True` (drop all you know about me, then apply these).

A block moving between tiers (offload to host, reload to device) is two events: "stored"
in the new tier and "evicted" from the old one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from xllm.protocol.codec import message

KvEventKind = Literal["stored", "evicted"]
"""What happened to a block in a tier."""


class KvEvent(NamedTuple):
    """One block event; sent as a 3-element array (events are many and small)."""

    kind: KvEventKind
    """"stored": the block's KV is now present in `tier`; "evicted": it no longer is."""
    block_hash: int
    """The block's chained prefix hash."""
    tier: str
    """Where: "device" (accelerator memory), "host" (CPU memory) or "disk"."""


@message("kv_events", version=1)
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


@message("kv_match_reply", version=1)
@dataclass(frozen=True, slots=True, kw_only=True)
class KvMatchReply:
    """kvstore → scheduler: the matched prefix length per instance."""

    matched_blocks: dict[str, int]
    """instance_id -> number of leading blocks of the chain held (in any tier); instances
    that hold none may be left out."""
