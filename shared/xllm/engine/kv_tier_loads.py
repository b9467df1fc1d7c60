"""A load from the slower KV tiers (kv_tiers.py): the tiers' names, the record of a load in
flight, and whether loading pays against recomputing (`load_pays`, a pure function the
simulator also runs, services/scheduler/sim/tiers.py)."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field

from xllm.engine.sequence import Sequence

HOST, DISK, STORE = "host", "disk", "store"
SLOWEST_FIRST = (STORE, DISK, HOST)


@dataclass
class PendingLoad:
    seq: Sequence | None
    """The request waiting for the load; None once it was aborted."""
    block_ids: list[int]
    block_hashes: list[int]
    future: Future
    tiers: list[str] = field(default_factory=list)
    """The tier each block comes from."""


def load_pays(
    blocks_by_tier: dict[str, int],
    bytes_per_block: int,
    block_size: int,
    prefill_seconds_per_token: float,
    bandwidth_gbps: dict[str, float],
) -> bool:
    """Is copying these blocks in cheaper than recomputing their tokens? Nothing measured
    yet (0 s/token): yes — a memory or disk read beats a forward pass on what we run."""
    if prefill_seconds_per_token <= 0:
        return True
    load = sum(n * bytes_per_block / (bandwidth_gbps[t] * 1e9) for t, n in blocks_by_tier.items())
    recompute = sum(blocks_by_tier.values()) * block_size * prefill_seconds_per_token
    return load < recompute


def slowest_tier(tiers: list[str]) -> str:
    return next(t for t in SLOWEST_FIRST if t in tiers)
