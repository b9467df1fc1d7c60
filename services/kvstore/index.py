"""KvIndex: the cluster-wide prefix-cache index, kept in Redis.

Layout (every key under `prefix`, default "xllm:kv:"):

    block:<hash>        HASH  instance_id -> tiers      who holds this block, and in which of
                                                        its tiers ("device,host": fastest
                                                        first, comma-separated)
    inst:<id>:blocks    SET   block hashes              what one instance holds (for its count,
                                                        a reset and dropping a dead instance)
    inst:<id>:seq       STRING                          the last `KvEvents.seq` applied
    instances           SET   instance ids              every instance with state here

Every change runs as one Lua script, so a reader never sees a block in `block:<hash>`
without it in the instance's set (or the other way round), and a kvstore process that dies
halfway through a message leaves either all or none of it applied. The index holds no state
outside Redis: a restarted kvstore (or a second replica) reads the same truth.

A match walks the request's hash chain in one script too: it stops at the first block
nobody holds, so a miss costs one lookup, and a hit of k blocks costs k.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

from redis.asyncio import Redis

from xllm.protocol import KvEvent

# The tiers of one instance's copies of a block, as the hash field's value: their names,
# fastest first, comma-separated ("device,host").
_TIER_SET = """
local TIERS = {"device", "host", "disk", "store"}
local function parse(text)
  local set = {}
  if text then for t in string.gmatch(text, "[^,]+") do set[t] = true end end
  return set
end
local function join(set)
  local out = {}
  for _, t in ipairs(TIERS) do if set[t] then table.insert(out, t) end end
  return table.concat(out, ",")
end
"""

# KEYS: [block prefix, instance blocks set, instance seq key, instances set]
# ARGV: [instance id, seq, reset (0/1), kind1, hash1, tier1, kind2, hash2, tier2, ...]
_APPLY = (
    _TIER_SET
    + """
local block_prefix, inst_blocks, inst_seq, instances = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local iid = ARGV[1]
local prev_seq = redis.call("GET", inst_seq) or "-1"
if ARGV[3] == "1" then
  for _, h in ipairs(redis.call("SMEMBERS", inst_blocks)) do
    redis.call("HDEL", block_prefix .. h, iid)
  end
  redis.call("DEL", inst_blocks)
end
for i = 4, #ARGV, 3 do
  local kind, h, tier = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  local key = block_prefix .. h
  local tiers = parse(redis.call("HGET", key, iid))
  tiers[tier] = (kind == "stored") or nil
  local value = join(tiers)
  if value ~= "" then
    redis.call("HSET", key, iid, value)
    redis.call("SADD", inst_blocks, h)
  else
    -- evicted from its last tier here
    redis.call("HDEL", key, iid)
    redis.call("SREM", inst_blocks, h)
  end
end
redis.call("SET", inst_seq, ARGV[2])
redis.call("SADD", instances, iid)
return {redis.call("SCARD", inst_blocks), tonumber(prev_seq)}
"""
)

# KEYS: [block prefix, instance blocks set, instance seq key, instances set]; ARGV: [instance id]
_DROP = """
local block_prefix, inst_blocks, inst_seq, instances = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
for _, h in ipairs(redis.call("SMEMBERS", inst_blocks)) do
  redis.call("HDEL", block_prefix .. h, ARGV[1])
end
redis.call("DEL", inst_blocks, inst_seq)
return redis.call("SREM", instances, ARGV[1])
"""

# KEYS: [block prefix]; ARGV: hashes of the chain, block 0 first.
# Returns a flat [leading blocks some instance put in the store, then per instance holding
# block 0: instance, matched blocks, blocks whose fastest copy is on device, in host, on
# disk, in the store, ...]. (The store run ends where its putters' runs do: a putter keeps
# "store" among its tiers, so it stays alive in the walk while the run goes on.)
_MATCH = """
local FASTEST = {device = 1, host = 2, disk = 3, store = 4}
local alive, matched, by_tier = {}, {}, {}
local first = redis.call("HGETALL", KEYS[1] .. ARGV[1])
if #first == 0 then return {0} end
local remaining, store_run = 0, 0
local function count(iid, tiers)
  local t = FASTEST[string.match(tiers, "^[^,]+")] or 4
  by_tier[iid][t] = by_tier[iid][t] + 1
end
local function in_store(i, flat)
  if store_run ~= i - 1 then return end
  for j = 2, #flat, 2 do
    if string.find(flat[j], "store", 1, true) then store_run = i; return end
  end
end
for j = 1, #first, 2 do
  local iid = first[j]
  alive[iid] = true; matched[iid] = 1; by_tier[iid] = {0, 0, 0, 0}; remaining = remaining + 1
  count(iid, first[j + 1])
end
in_store(1, first)
for i = 2, #ARGV do
  if remaining == 0 then break end
  local holders = {}
  local flat = redis.call("HGETALL", KEYS[1] .. ARGV[i])
  for j = 1, #flat, 2 do holders[flat[j]] = flat[j + 1] end
  in_store(i, flat)
  for iid, _ in pairs(alive) do
    if holders[iid] then
      matched[iid] = i
      count(iid, holders[iid])
    else
      alive[iid] = nil
      remaining = remaining - 1
    end
  end
end
local out = {store_run}
for iid, n in pairs(matched) do
  table.insert(out, iid); table.insert(out, n)
  for t = 1, 4 do table.insert(out, by_tier[iid][t]) end
end
return out
"""

TIERS = ("device", "host", "disk", "store")
"""Fastest first; a block's tier in a match is the fastest one holding it."""


class TierMatch(NamedTuple):
    matched: dict[str, int]
    """instance -> leading blocks of the chain it holds, in any tier."""
    by_tier: dict[str, dict[str, int]]
    """instance -> {tier: of those, the blocks whose fastest copy is there}."""
    store_blocks: int
    """Leading blocks of the chain some instance put in the store (any instance can fetch
    them; the store may have evicted some since)."""


class Applied(NamedTuple):
    num_blocks: int
    """Blocks the instance holds after the message."""
    prev_seq: int | None
    """The `seq` applied before this message (read in the same script), None if none was."""


class KvIndex:
    """Reads and writes the index; one instance per process, safe for concurrent tasks."""

    def __init__(self, redis: Redis, prefix: str = "xllm:kv:"):
        self.redis = redis
        self.prefix = prefix
        self._apply = redis.register_script(_APPLY)
        self._drop = redis.register_script(_DROP)
        self._match = redis.register_script(_MATCH)

    def _instance_keys(self, instance_id: str) -> list[str]:
        p = self.prefix
        return [f"{p}block:", f"{p}inst:{instance_id}:blocks", f"{p}inst:{instance_id}:seq"] + [
            f"{p}instances"
        ]

    async def apply(
        self, instance_id: str, events: Iterable[KvEvent], seq: int, reset: bool = False
    ) -> Applied:
        """Apply one `KvEvents` message (a reset first clears the instance)."""
        argv: list[str | int] = [instance_id, seq, int(reset)]
        for kind, block_hash, tier in events:
            argv += [kind, block_hash, tier]
        num_blocks, prev_seq = await self._apply(keys=self._instance_keys(instance_id), args=argv)
        return Applied(int(num_blocks), None if prev_seq < 0 else int(prev_seq))

    async def drop_instance(self, instance_id: str) -> bool:
        """Forget everything about an instance (it died); True if it was known."""
        return bool(await self._drop(keys=self._instance_keys(instance_id), args=[instance_id]))

    async def match(
        self, block_hashes: Sequence[int], instance_ids: Iterable[str] = ()
    ) -> dict[str, int]:
        """instance -> number of leading blocks of the chain it holds (those holding none are
        left out); only `instance_ids` if given."""
        return (await self.match_tiers(block_hashes, instance_ids)).matched

    async def match_tiers(
        self, block_hashes: Sequence[int], instance_ids: Iterable[str] = ()
    ) -> TierMatch:
        """`match`, per instance how many of its matched blocks are fastest in each tier
        (tiers holding none left out), and how many leading blocks the store holds."""
        if not block_hashes:
            return TierMatch({}, {}, 0)
        flat = await self._match(keys=[f"{self.prefix}block:"], args=list(block_hashes))
        wanted = set(instance_ids)
        matched: dict[str, int] = {}
        by_tier: dict[str, dict[str, int]] = {}
        for i in range(1, len(flat), 6):
            instance_id = _text(flat[i])
            if wanted and instance_id not in wanted:
                continue
            matched[instance_id] = int(flat[i + 1])
            counts = zip(TIERS, flat[i + 2 : i + 6], strict=True)
            by_tier[instance_id] = {tier: int(n) for tier, n in counts if int(n)}
        return TierMatch(matched, by_tier, int(flat[0]))

    async def tiers_of(self, block_hash: int) -> dict[str, set[str]]:
        """instance -> the tiers holding its copies of one block."""
        held = await self.redis.hgetall(f"{self.prefix}block:{block_hash}")
        return {_text(i): set(_text(t).split(",")) for i, t in held.items()}

    async def instances(self) -> set[str]:
        return {_text(i) for i in await self.redis.smembers(f"{self.prefix}instances")}

    async def last_seq(self, instance_id: str) -> int | None:
        value = await self.redis.get(f"{self.prefix}inst:{instance_id}:seq")
        return None if value is None else int(value)

    async def block_count(self, instance_id: str) -> int:
        return int(await self.redis.scard(f"{self.prefix}inst:{instance_id}:blocks"))

    async def blocks(self, instance_id: str) -> set[int]:
        members = await self.redis.smembers(f"{self.prefix}inst:{instance_id}:blocks")
        return {int(h) for h in members}


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
