"""Property tests of the block manager: its invariants hold under any sequence of operations.

A random program of admit / grow / cache / fork / free / preempt runs against a small pool;
after every operation: no block is both free and referenced, every ref count equals the
number of live block tables holding the block, and cached hashes point at their blocks.
At the end, when every sequence is gone, every ref count is back to zero.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from xllm.engine.block_manager import BlockManager
from xllm.engine.sequence import Sequence
from xllm.protocol.types import SamplingParams

BLOCK = 4

# Prompts drawn from a few shared stems, so prefix hits really happen.
STEMS = [[1] * 12, [2] * 9, [1] * 8 + [3] * 8]


def check(bm: BlockManager, live: list[Sequence]) -> None:
    bm.check_integrity()
    refs = Counter(b for s in live for b in s.block_table)
    for block in bm.blocks:
        assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])


def admit(bm: BlockManager, seq: Sequence) -> bool:
    cached = bm.find_cached_prefix(seq)
    num_cached = len(cached) * BLOCK
    if not bm.allocate(seq, seq.num_tokens - num_cached, cached):
        return False
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return True


ops = st.lists(
    st.tuples(
        st.sampled_from(["admit", "grow", "fork", "free"]),
        st.integers(0, len(STEMS) - 1),
        st.integers(0, 7),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops, st.integers(4, 24))
def test_invariants_hold_under_any_program(program, num_blocks):
    bm = BlockManager(num_blocks, BLOCK)
    live: list[Sequence] = []
    for step, (op, stem, extra) in enumerate(program):
        if op == "admit":
            seq = Sequence(f"r{step}", STEMS[stem] + [100 + step] * extra, SamplingParams())
            if admit(bm, seq):
                live.append(seq)
        elif op == "grow" and live:
            seq = live[extra % len(live)]
            if bm.allocate(seq, 1):
                seq.token_ids.append(7)
                seq.num_computed_tokens += 1
                bm.cache_full_blocks(seq)
        elif op == "fork" and live:
            parent = live[extra % len(live)]
            if parent.num_output_tokens == 0 and bm.num_free_blocks > 0:
                child = parent.fork(1)
                bm.fork(parent, child)
                child.num_computed_tokens = parent.num_computed_tokens
                live.append(child)
        elif op == "free" and live:
            bm.free(live.pop(extra % len(live)))
        check(bm, live)
    while live:
        bm.free(live.pop())
        check(bm, live)
    assert all(b.ref_count == 0 for b in bm.blocks)
    assert bm.num_free_blocks == num_blocks


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, len(STEMS) - 1), min_size=1, max_size=30), st.integers(3, 12))
def test_eviction_never_frees_a_referenced_block(stems, num_blocks):
    """Hold one sequence for the whole run while others churn through a tiny pool: its
    blocks must never be handed out again, whatever gets evicted."""
    bm = BlockManager(num_blocks, BLOCK)
    pinned = Sequence("pinned", STEMS[0], SamplingParams())
    assert admit(bm, pinned)
    pinned_blocks = list(pinned.block_table)
    for i, stem in enumerate(stems):
        seq = Sequence(f"r{i}", STEMS[stem] + [200 + i] * 5, SamplingParams())
        if admit(bm, seq):
            shared = [b for b in seq.block_table if b in pinned_blocks]
            # Sharing happens only through a cache hit: the same leading prefix.
            assert shared == pinned_blocks[: len(shared)] == seq.block_table[: len(shared)]
            assert all(bm.blocks[b].ref_count >= 2 for b in shared)
            bm.free(seq)
        assert pinned.block_table == pinned_blocks
        assert all(bm.blocks[b].ref_count >= 1 for b in pinned_blocks)
        bm.check_integrity()


def test_prefix_hit_reuses_blocks_and_counts_them():
    bm = BlockManager(16, BLOCK)
    first = Sequence("a", list(range(10)), SamplingParams())
    assert admit(bm, first)
    first_blocks = list(first.block_table)
    bm.free(first)  # still cached after free
    second = Sequence("b", list(range(8)) + [99, 98, 97], SamplingParams())
    hit = bm.find_cached_prefix(second)
    assert hit == first_blocks[:2]  # blocks of tokens [0..3] and [4..7]
    # The last prompt token is never served from cache.
    exact = Sequence("c", list(range(8)), SamplingParams())
    assert len(bm.find_cached_prefix(exact)) == 1


def test_free_puts_uncached_blocks_first_in_line():
    bm = BlockManager(4, BLOCK)
    seq = Sequence("a", list(range(6)), SamplingParams())  # one full block, one partial
    assert admit(bm, seq)
    full, partial = seq.block_table
    bm.free(seq)
    assert next(iter(bm.free_blocks)) == partial  # reused before the cached full block
    assert bm.cached_blocks[seq.block_hashes[0]] == full
