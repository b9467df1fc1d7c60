"""Property tests of the KV tiers: under any program of admits, growth, frees, loads and aborts
against a small device pool with host and disk tiers behind it, the tier invariants hold
after every operation (`KvTiers.check_integrity`: device-cached => in host, no host block used
twice, pins = loads in flight), every block a request finds in the prefix cache holds the KV
of its prefix (each block is filled with a value derived from its hash when computed, and
checked when reused, wherever it came back from), and at the end no block is leaked: every
device block is free, every host block is free or holds a block, and disk holds exactly the
files its index names."""

from __future__ import annotations

import os
from collections import Counter

import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_cache import KVCache
from xllm.engine.kv_tiers import KvTiers
from xllm.engine.sequence import Sequence
from xllm.protocol.types import SamplingParams

BLOCK = 2
STEMS = [[1] * 6, [2] * 5, [1] * 4 + [3] * 4, [4] * 8, [5, 6] * 4]


def value_of(block_hash: int) -> float:
    return float(block_hash % 2**20)


class Driver:
    """Plays the scheduler: admits (through the tiers), computes, frees."""

    def __init__(self, num_blocks: int, num_host: int, num_disk: int, disk_dir: str):
        self.kv = KVCache(1, num_blocks, BLOCK, 1, 1, torch.float32, torch.device("cpu"))
        self.bm = BlockManager(num_blocks, BLOCK)
        self.tiers = KvTiers(self.kv, self.bm, num_host, disk_dir, num_disk)
        self.live: list[Sequence] = []
        self.loading: list[Sequence] = []

    def block_values(self, block_id: int) -> torch.Tensor:
        return self.kv.tensor[:, :, block_id * BLOCK : (block_id + 1) * BLOCK]

    def add(self, seq: Sequence) -> None:
        for block in self.bm.blocks:  # stale KV in blocks that hold nothing: poison it
            if block.ref_count == 0 and block.block_hash is None:
                self.block_values(block.block_id).fill_(-1.0)
        if self.tiers.start_load(seq, 0.0):
            event("load")
            self.loading.append(seq)
        else:
            self.admit(seq)

    def admit(self, seq: Sequence) -> None:
        cached = self.bm.find_cached_prefix(seq)
        hashes = seq.full_block_hashes(BLOCK)
        for i, block_id in enumerate(cached):
            assert (self.block_values(block_id) == value_of(hashes[i])).all(), "wrong KV"
        if not self.bm.allocate(seq, seq.num_tokens - len(cached) * BLOCK, cached):
            return
        for i in range(len(cached), len(hashes)):  # "compute" the new full blocks
            self.block_values(seq.block_table[i]).fill_(value_of(hashes[i]))
        seq.num_computed_tokens = seq.num_tokens
        self.bm.cache_full_blocks(seq)
        self.live.append(seq)

    def poll(self, wait: bool) -> None:
        for seq in self.tiers.poll(wait=wait):
            self.loading.remove(seq)
            self.admit(seq)

    def check(self) -> None:
        self.bm.check_integrity()
        self.tiers.check_integrity()
        refs = Counter(b for s in self.live for b in s.block_table)
        refs.update(b for load in self.tiers.loads for b in load.block_ids)
        for block in self.bm.blocks:
            assert block.ref_count == refs[block.block_id], (block, refs[block.block_id])


ops = st.lists(
    st.tuples(
        st.sampled_from(["add"] * 4 + ["free"] * 4 + ["grow", "abort", "poll", "poll"]),
        st.integers(0, len(STEMS) - 1),
        st.integers(0, 5),
    ),
    min_size=10,
    max_size=80,
)


@settings(max_examples=150, deadline=None)
@given(ops, st.integers(4, 10), st.integers(0, 8), st.integers(0, 10))
def test_tier_invariants_hold_and_nothing_leaks(tmp_path_factory, program, nb, host_extra, disk):
    disk_dir = str(tmp_path_factory.mktemp("kv"))
    d = Driver(nb, nb + host_extra, disk, disk_dir)
    for step, (op, stem, extra) in enumerate(program):
        if op == "add":
            d.add(Sequence(f"r{step}", STEMS[stem] + [100 + step] * extra, SamplingParams()))
        elif op == "grow" and d.live:
            seq = d.live[extra % len(d.live)]
            if d.bm.allocate(seq, 1):
                seq.token_ids.append(7)
                hashes = seq.full_block_hashes(BLOCK)
                if seq.num_tokens % BLOCK == 0:
                    d.block_values(seq.block_table[-1]).fill_(value_of(hashes[-1]))
                seq.num_computed_tokens += 1
                d.bm.cache_full_blocks(seq)
        elif op == "free" and d.live:
            d.bm.free(d.live.pop(extra % len(d.live)))
        elif op == "abort" and d.loading:
            seq = d.loading.pop(extra % len(d.loading))
            assert d.tiers.forget(seq)
        elif op == "poll":
            d.poll(wait=extra % 2 == 0)
        d.tiers.write_through()  # what the engine does at the start of every step
        d.check()
    while d.live:
        d.bm.free(d.live.pop())
    while d.tiers.loads:
        d.poll(wait=True)
        while d.live:
            d.bm.free(d.live.pop())
    d.tiers.write_through()
    d.check()
    assert all(b.ref_count == 0 for b in d.bm.blocks)
    assert len(d.tiers.host.index) + len(d.tiers.host.free) == nb + host_extra
    d.tiers.worker.submit(lambda: None).result()  # the disk writes and removals are done
    disk = d.tiers.disk
    files = set(os.listdir(disk.dir)) if disk is not None else set()
    assert files == {f"{h:016x}.kv" for h in disk or ()}
    d.tiers.close()
