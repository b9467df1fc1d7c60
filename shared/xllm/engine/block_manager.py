"""BlockManager: bookkeeping of the paged KV pool — which block holds what, and who uses it.

Pure CPU bookkeeping; the tensors live in `kv_cache.py`. Each block is in exactly one of
two states:

  * referenced: `ref_count > 0`, in one or more sequences' block tables;
  * free: `ref_count == 0`, in `free_blocks` (an LRU queue, front evicted first).

A free block may still be *cached*: it keeps its `block_hash` and stays findable in
`cached_blocks` until it is handed out again (eviction). A sequence that finds its prefix
there takes the block back (ref 0 -> 1) without recomputing it.

Only full blocks are hashed and shared. Sharing a partial block would let two sequences
write the same slots; forks copy their last partial block instead.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from xllm.engine.sequence import Sequence
from xllm.protocol.stats import KvCacheStats


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    hit_tokens: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0 and block_size > 0
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[int, int] = {}
        """block hash -> id of a block holding that prefix (referenced or free)."""
        self.stats = PrefixCacheStats()
        self.events: list[tuple[str, int]] = []
        """("stored" | "evicted", block hash), drained by whoever publishes KV events."""
        self.stored_log: list[tuple[int, int]] | None = None
        """(block hash, block id) of each block cached, for the slower KV tiers to copy
        (`kv_tiers.py`); None (no tiers) = not kept."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def kv_stats(self) -> KvCacheStats:
        """The pool and prefix cache as heartbeats report them."""
        return KvCacheStats(
            blocks_used=self.num_used_blocks,
            blocks_free=self.num_free_blocks,
            prefix_queried_tokens=self.stats.queried_tokens,
            prefix_hit_tokens=self.stats.hit_tokens,
        )

    # -- prefix cache ---------------------------------------------------------------------

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of the blocks holding the longest cached prefix of `seq` (no state change).

        The last prompt token is never served from cache: its logits are needed, so at
        most `(num_tokens - 1) // block_size` blocks can hit.
        """
        if not self.enable_prefix_caching:
            return []
        return self.cached_blocks_of(seq.full_block_hashes(self.block_size), seq.num_tokens)

    def cached_blocks_of(self, block_hashes: list[int], num_tokens: int) -> list[int]:
        """`find_cached_prefix` for a prompt of `num_tokens` known by its `block_hashes`."""
        hit: list[int] = []
        max_blocks = (num_tokens - 1) // self.block_size
        for block_hash in block_hashes[:max_blocks]:
            block_id = self.cached_blocks.get(block_hash)
            if block_id is None:
                break
            hit.append(block_id)
        return hit

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queried_tokens += num_tokens
        self.stats.hit_tokens += num_hit_tokens

    # -- allocation -----------------------------------------------------------------------

    def num_blocks_needed(
        self, seq: Sequence, num_new_tokens: int, num_cached_blocks: int = 0
    ) -> int:
        held = len(seq.block_table) + num_cached_blocks
        computed = max(seq.num_computed_tokens, num_cached_blocks * self.block_size)
        return max(0, cdiv(computed + num_new_tokens, self.block_size) - held)

    def allocate(
        self,
        seq: Sequence,
        num_new_tokens: int,
        cached_blocks: list[int] = (),  # type: ignore[assignment]
        num_extra_blocks: int = 0,
    ) -> bool:
        """Give `seq` room for `num_new_tokens` more tokens, taking `cached_blocks` first.

        `num_extra_blocks` must also be free (room a fork will take). Returns False and
        changes nothing when the pool cannot hold it.
        """
        num_new_blocks = self.num_blocks_needed(seq, num_new_tokens, len(cached_blocks))
        # Cached blocks that sit in the free queue stop being allocatable once taken.
        num_revived = sum(1 for b in cached_blocks if self.blocks[b].ref_count == 0)
        if num_new_blocks + num_extra_blocks > self.num_free_blocks - num_revived:
            return False
        for block_id in cached_blocks:
            self._take(block_id)
            seq.block_table.append(block_id)
        for _ in range(num_new_blocks):
            seq.block_table.append(self._pop_free())
        return True

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; cached ones stay findable until evicted."""
        # Tail first, so a prefix's last blocks (shared by fewer requests) are evicted
        # before its head blocks.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_blocks[block_id] = None
                if block.block_hash is None:
                    # Holds nothing reusable: hand it out before any cached block.
                    self.free_blocks.move_to_end(block_id, last=False)
        seq.block_table = []
        seq.num_published_blocks = 0

    def free_tail(self, seq: Sequence, num_tokens: int) -> None:
        """Free `seq`'s blocks wholly past its first `num_tokens` slots (those that held only
        rejected speculative drafts). They were allocated for this sequence alone this step,
        so they are unshared and hold nothing cached."""
        keep = cdiv(num_tokens, self.block_size)
        for block_id in seq.block_table[keep:]:
            block = self.blocks[block_id]
            assert block.ref_count == 1 and block.block_hash is None, block
            block.ref_count = 0
            self.free_blocks[block_id] = None
            self.free_blocks.move_to_end(block_id, last=False)  # nothing reusable in it
        del seq.block_table[keep:]

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Publish the blocks `seq` has completely computed into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_published_blocks:
            return  # called every step: a decode completes a block once in block_size steps
        hashes = seq.full_block_hashes(self.block_size)
        for i in range(seq.num_published_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is not None:
                continue
            block_hash = hashes[i]
            if block_hash in self.cached_blocks:
                continue  # computed twice (e.g. two requests admitted together): keep the first
            block.block_hash = block_hash
            self.cached_blocks[block_hash] = block.block_id
            self.events.append(("stored", block_hash))
            if self.stored_log is not None:
                self.stored_log.append((block_hash, block.block_id))
        # Skip next time only what is published for good (a referenced block keeps its hash);
        # a duplicate stays in range, to be published if the first copy is evicted.
        i = seq.num_published_blocks
        while i < num_full and self.blocks[seq.block_table[i]].block_hash is not None:
            i += 1
        seq.num_published_blocks = i

    def fork(self, parent: Sequence, child: Sequence) -> tuple[int, int] | None:
        """Share `parent`'s full blocks with `child`; copy the partial last one.

        Returns the (src, dst) block copy the KV cache must perform, if any. The caller
        reserved the block for the copy (`num_extra_blocks` in `allocate`).
        """
        num_full = parent.num_tokens // self.block_size
        for block_id in parent.block_table[:num_full]:
            self.blocks[block_id].ref_count += 1
            child.block_table.append(block_id)
        if num_full == len(parent.block_table):
            return None
        dst = self._pop_free()
        child.block_table.append(dst)
        return parent.block_table[num_full], dst

    def drain_events(self) -> list[tuple[str, int]]:
        events, self.events = self.events, []
        return events

    # -- blocks loaded from a slower tier (kv_tiers.py) ------------------------------------

    def reserve_for_load(self, num_blocks: int, keep: list[int]) -> list[int] | None:
        """Take `num_blocks` free blocks for a load in flight (ref 1, in no block table, not
        findable), evicting none of `keep` (the request's device-cached blocks); None if the
        pool has not that many free blocks besides `keep`."""
        revived = [b for b in keep if self.blocks[b].ref_count == 0]
        if num_blocks > self.num_free_blocks - len(revived):
            return None
        for block_id in keep:
            self._take(block_id)
        taken = [self._pop_free() for _ in range(num_blocks)]
        for block_id in reversed(keep):  # back as most recently used, head last
            self._put_back(block_id)
        return taken

    def finish_load(self, block_ids: list[int], block_hashes: list[int]) -> None:
        """The loaded blocks hold their prefixes now: make them findable (free, most recently
        used, head block last), or drop a copy whose prefix got computed meanwhile."""
        for block_id, block_hash in zip(reversed(block_ids), reversed(block_hashes), strict=True):
            if block_hash not in self.cached_blocks:
                self.blocks[block_id].block_hash = block_hash
                self.cached_blocks[block_hash] = block_id
                self.events.append(("stored", block_hash))
            self._put_back(block_id)

    def release_load(self, block_ids: list[int]) -> None:
        """A load failed or was dropped: its blocks hold nothing."""
        for block_id in block_ids:
            self._put_back(block_id)

    def _put_back(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block_id} released twice"
        if block.ref_count == 0:
            self.free_blocks[block_id] = None
            if block.block_hash is None:
                self.free_blocks.move_to_end(block_id, last=False)

    # -- internals ------------------------------------------------------------------------

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_blocks[block_id]
        block.ref_count += 1

    def _pop_free(self) -> int:
        block_id, _ = self.free_blocks.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            if self.cached_blocks.get(block.block_hash) == block_id:
                del self.cached_blocks[block.block_hash]
                self.events.append(("evicted", block.block_hash))
            block.block_hash = None
        block.ref_count = 1
        return block_id

    def check_integrity(self) -> None:
        """Assert the invariants in the module docstring (tests call this after each op)."""
        for block in self.blocks:
            in_free = block.block_id in self.free_blocks
            assert block.ref_count >= 0, block
            assert in_free == (block.ref_count == 0), f"{block} free={in_free}"
        for block_hash, block_id in self.cached_blocks.items():
            assert self.blocks[block_id].block_hash == block_hash, (block_hash, block_id)
