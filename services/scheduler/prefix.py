"""Prefix matching for placement (report §3.4, step one): how much of a request's prompt
each instance already has in its KV cache.

Two sources, and the larger counts per instance:

* the kvstore (`KV_MATCH`): what the instances reported in their KV events, a few hundred
  milliseconds behind;
* `RecentPlacements`: the scheduler's own memory of which prefix chains it sent where in
  the last few seconds. It covers the gap until those requests' blocks show up in the
  kvstore, so a burst of requests sharing a new system prompt lands together instead of
  computing the prompt once per instance.

The hash chain is computed here, from the prompt tokens and the instances' block size
(from their heartbeats), with the engine's own `block_hashes`, so a match means the engine
will really hit. Images count by content, as in the engine (`hash_prompt`): two prompts
with the same text around different images share no block from the first image on. The
kvstore is an optimisation: if it does not answer within `timeout`, placement goes on with
what `RecentPlacements` knows.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError, TimeoutError

from xllm.engine.prefix_hash import block_hashes
from xllm.protocol import (
    DecodeError,
    KvMatchReply,
    KvMatchRequest,
    RequestSpec,
    decode_as,
    encode,
    subjects,
)

log = logging.getLogger(__name__)


def hash_prompt(request: RequestSpec) -> list[int]:
    """The prompt as the engine's block hashes see it (`MultimodalPrompt.hash_prompt`):
    each image's placeholders replaced by -(its content hash) - 1. An image whose hash or
    place the gateway did not give ends the prompt there (nothing after it can match)."""
    if not request.images:
        return request.prompt_token_ids
    tokens = list(request.prompt_token_ids)
    for image in request.images:
        if image.offset < 0:
            return []  # where its placeholders are is unknown: none of the prompt is sure
        if not image.content_hash:
            return tokens[: image.offset]
        tokens[image.offset : image.offset + image.num_tokens] = [
            -image.content_hash - 1
        ] * image.num_tokens
    return tokens


class RecentPlacements:
    """block hash -> instances it was recently sent to (each with its own time), forgotten
    after `ttl` seconds; beyond `capacity` hashes the least recently placed go first."""

    def __init__(self, ttl: float = 10.0, capacity: int = 1 << 16):
        self.ttl = ttl
        self.capacity = capacity
        self._entries: OrderedDict[int, dict[str, float]] = OrderedDict()

    def add(self, hashes: Iterable[int], instance_id: str, now: float) -> None:
        for h in hashes:
            holders = self._entries.pop(h, {})
            holders[instance_id] = now
            self._entries[h] = holders  # to the end: most recently placed
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)

    def match(self, hashes: Sequence[int], now: float) -> dict[str, int]:
        """instance -> leading blocks of `hashes` placed there within the ttl."""
        self._expire(now)
        matched: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = {iid for iid, t in self._entries.get(h, {}).items() if now - t <= self.ttl}
            alive = holders if alive is None else alive & holders
            if not alive:
                break
            for instance_id in alive:
                matched[instance_id] = i + 1
        return matched

    def _expire(self, now: float) -> None:
        while self._entries:
            h, holders = next(iter(self._entries.items()))
            if now - max(holders.values()) <= self.ttl:
                return
            del self._entries[h]


@dataclass
class PrefixMatch:
    hits: dict[str, int] = field(default_factory=dict)
    """instance -> leading prompt tokens it holds (any tier)."""
    tiers: dict[str, dict[str, int]] = field(default_factory=dict)
    """instance -> {tier: hit blocks fastest there}; empty when the kvstore has no tiers."""
    store_blocks: int = 0
    """Leading prompt blocks in the cluster store (of the largest block size asked)."""


class PrefixMatcher:
    def __init__(self, nc: NATS, timeout: float = 0.05, recent_ttl: float = 10.0):
        self.nc = nc
        self.timeout = timeout
        self.recent = RecentPlacements(recent_ttl)
        self.kvstore_answers = True
        """Whether the last match request got an answer (logged when it changes)."""

    async def hit_tokens(self, prompt: Sequence[int], candidates: dict[str, int]) -> dict[str, int]:
        """instance -> prompt tokens it holds, for `candidates` (instance -> block size)."""
        return (await self.match(prompt, candidates)).hits

    async def match(self, prompt: Sequence[int], candidates: dict[str, int]) -> PrefixMatch:
        """`hit_tokens`, with the kvstore's tiers of the hit blocks and the store's run."""
        found = PrefixMatch()
        for block_size in set(candidates.values()):
            ids = [i for i, size in candidates.items() if size == block_size]
            chain = block_hashes(prompt, block_size)
            if not chain:
                continue
            blocks = self.recent.match(chain, time.monotonic())
            reply = await self._ask_kvstore(chain, ids)
            for instance_id, n in reply.matched_blocks.items():
                blocks[instance_id] = max(n, blocks.get(instance_id, 0))
            found.hits.update({i: n * block_size for i, n in blocks.items() if i in ids})
            if reply.matched_tiers or reply.store_blocks:
                for i in ids:  # a recent placement not in the index yet: its device
                    tiers = dict(reply.matched_tiers.get(i, {}))
                    recent = blocks.get(i, 0) - sum(tiers.values())
                    if recent > 0:
                        tiers["device"] = tiers.get("device", 0) + recent
                    found.tiers[i] = tiers
                found.store_blocks = max(found.store_blocks, reply.store_blocks)
        return found

    def placed(self, prompt: Sequence[int], instance_id: str, block_size: int) -> None:
        self.recent.add(block_hashes(prompt, block_size), instance_id, time.monotonic())

    async def _ask_kvstore(self, chain: list[int], instance_ids: list[str]) -> KvMatchReply:
        request = KvMatchRequest(block_hashes=chain, instance_ids=instance_ids)
        try:
            msg = await self.nc.request(subjects.KV_MATCH, encode(request), timeout=self.timeout)
            reply = decode_as(msg.data, KvMatchReply)
        except (TimeoutError, NoRespondersError, DecodeError) as e:
            if self.kvstore_answers:
                log.warning(
                    "kvstore did not answer a prefix match (%s); using recent placements", e
                )
            self.kvstore_answers = False
            return KvMatchReply(matched_blocks={})
        if not self.kvstore_answers:
            log.info("kvstore answers prefix matches again")
        self.kvstore_answers = True
        return reply
