"""Online/offline priority in the engine: online work first, offline work preempted by it
keeping its KV (swapped to host memory and back), and nothing leaked or corrupted.

The scheduler alone is driven with fake tokens, and a fake KV pool checks the swaps: every
slot holds a digest of the tokens up to its position, written when a step "computes" it
and moved by the step's swap copies, so a block swapped back holding anything but its own
prefix fails the check before the next forward would read it. The engine with the tiny
model then shows greedy offline outputs unchanged by an online burst that swaps them out.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.conftest import greedy, make_engine
from xllm.engine.block_manager import BlockManager
from xllm.engine.scheduler import Scheduler, SchedulerOutput
from xllm.engine.sequence import Sequence, SequenceStatus
from xllm.protocol.types import SamplingParams

BLOCK = 4


def make(num_blocks=16, host_blocks=8, max_num_seqs=4, budget=16) -> Scheduler:
    bm = BlockManager(num_blocks, BLOCK)
    return Scheduler(bm, max_num_seqs, budget, 256, num_host_blocks=host_blocks)


def seq(rid: str, n_prompt: int, priority: int = 0, max_tokens: int = 6, base: int = 0):
    tokens = [1000 * (base + 1) + i for i in range(n_prompt)]
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    return Sequence(rid, tokens, params, priority=priority)


class FakeKv:
    """Slot contents of the device pool and the host swap space, as the engine moves them."""

    def __init__(self):
        self.device: dict[int, object] = {}
        self.host: dict[int, object] = {}

    def run(self, s: Scheduler, out: SchedulerOutput) -> None:
        """The engine's step: swap copies, then check what the forward reads, then write."""
        for dev, host in out.swap_out:
            for o in range(BLOCK):
                self.host[host * BLOCK + o] = self.device.get(dev * BLOCK + o)
        for host, dev in out.swap_in:
            for o in range(BLOCK):
                self.device[dev * BLOCK + o] = self.host.get(host * BLOCK + o)
        for item in out.scheduled:
            q = item.seq
            for pos in range(q.num_computed_tokens):  # what attention will read
                slot = q.block_table[pos // BLOCK] * BLOCK + pos % BLOCK
                assert self.device.get(slot) == digest(q, pos), (q, pos)
            for pos in range(q.num_computed_tokens, q.num_computed_tokens + item.num_new_tokens):
                self.device[q.block_table[pos // BLOCK] * BLOCK + pos % BLOCK] = digest(q, pos)


def digest(q: Sequence, pos: int) -> object:
    return hash(tuple(q.token_ids[: pos + 1]))


def step(s: Scheduler, kv: FakeKv | None = None, token: int = 7) -> SchedulerOutput:
    out = s.schedule()
    if kv is not None:
        kv.run(s, out)
    s.update(out, {x.seq.seq_id: token for x in out.scheduled if x.samples})
    return out


def check(s: Scheduler, num_host_blocks: int) -> None:
    s.block_manager.check_integrity()
    for queue in (s.running, list(s.waiting)):
        classes = [q.priority > 0 for q in queue]
        assert classes == sorted(classes), "an online sequence queued behind an offline one"
    held = [b for q in s.swapped for b in q.host_block_table]
    assert len(held) == len(set(held)) and not set(held) & set(s.free_host_blocks)
    assert len(held) + len(s.free_host_blocks) == num_host_blocks
    for q in s.swapped:
        assert q.status is SequenceStatus.SWAPPED and not q.block_table
        assert len(q.host_block_table) == -(-q.num_computed_tokens // BLOCK)
    for q in s.running:
        assert len(q.block_table) * BLOCK >= q.num_computed_tokens


def test_online_goes_first_and_an_online_burst_swaps_offline_work_out_and_back():
    s, kv = make(num_blocks=12, host_blocks=8, max_num_seqs=3, budget=32), FakeKv()
    offline = [seq(f"off{i}", 10, priority=1, max_tokens=20, base=i) for i in range(3)]
    for q in offline:
        s.add(q)
    step(s, kv)
    assert [q.request_id for q in s.running] == ["off0", "off1", "off2"]
    online = seq("on", 16, max_tokens=3, base=9)
    s.add(online)
    out = step(s, kv)
    assert s.running[0] is online  # admitted ahead of the offline ones, which made room
    assert out.swap_out and [q.request_id for q in s.swapped] == ["off2"]
    assert s.num_swap_outs == 1 and s.num_swapped_out_blocks == 3
    swapped_in = False
    while s.has_unfinished():
        out = step(s, kv)
        swapped_in |= bool(out.swap_in)
        check(s, 8)
    assert swapped_in and s.num_swapped_in_blocks == s.num_swapped_out_blocks
    assert all(q.num_output_tokens == 20 for q in offline)
    assert s.block_manager.num_free_blocks == 12 and len(s.free_host_blocks) == 8


def test_an_offline_prefill_only_gets_the_budget_online_work_leaves():
    s = make(num_blocks=64, budget=12)
    long_offline = seq("off", 40, priority=1)
    s.add(long_offline)
    step(s)
    assert long_offline.num_computed_tokens == 12
    s.add(seq("on", 8, base=3))
    out = step(s)
    assert [(x.seq.request_id, x.num_new_tokens) for x in out.scheduled] == [("on", 8), ("off", 4)]


def test_without_host_room_offline_work_is_recomputed_as_before():
    s, kv = make(num_blocks=8, host_blocks=0, max_num_seqs=2, budget=32), FakeKv()
    off = seq("off", 12, priority=1, max_tokens=10)
    s.add(off)
    step(s, kv)
    s.add(seq("on", 20, max_tokens=2, base=5))  # 5 blocks: only with off's 4 dropped
    step(s, kv)
    assert not s.swapped and off.status is SequenceStatus.WAITING and off.num_computed_tokens == 0
    while s.has_unfinished():
        step(s, kv)
    assert off.num_output_tokens == 10 and s.block_manager.num_free_blocks == 8


@settings(max_examples=300, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(6, 20), st.integers(0, 10), st.integers(1, 5))
def test_random_interleavings_leak_nothing_and_swap_back_the_right_kv(
    rng, num_blocks, host_blocks, max_num_seqs
):
    """Online and offline arrivals, aborts and steps in random order, on a pool small
    enough that online work keeps preempting offline work (swapped or recomputed)."""
    s, kv = make(num_blocks, host_blocks, max_num_seqs, budget=16), FakeKv()
    live: list[Sequence] = []
    for i in range(50):
        op = rng.choice(["online", "offline", "step", "step", "abort"])
        if op in ("online", "offline"):
            max_tokens = rng.randint(1, 8)
            q = seq(f"r{i}", rng.randint(1, 20), int(op == "offline"), max_tokens, base=i)
            if q.num_tokens + max_tokens <= num_blocks * BLOCK:  # the engine refuses the rest
                s.add(q)
                live.append(q)
        elif op == "abort" and live:
            q = live.pop(rng.randrange(len(live)))
            if not q.is_finished:
                s.finish(q, None)
        else:
            step(s, kv)
            check(s, host_blocks)
    for _ in range(5000):
        if not s.has_unfinished():
            break
        step(s, kv)
        check(s, host_blocks)
    assert not s.has_unfinished()
    assert s.block_manager.num_free_blocks == num_blocks
    assert len(s.free_host_blocks) == host_blocks
    for q in live:
        assert q.is_finished and q.num_output_tokens == q.params.max_tokens


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_offline_greedy_output_is_unchanged_by_an_online_burst_that_swaps_it(
    tiny_model_dir, async_scheduling
):
    model_dir = tiny_model_dir("qwen3")
    vocab = 1000
    offline_prompts = [[(7 * i + j) % vocab + 3 for j in range(40)] for i in range(3)]
    online_prompts = [[(11 * i + j) % vocab + 5 for j in range(60)] for i in range(3)]

    def run(with_burst: bool, swap_space_gb: float = 0.01):
        # 16 blocks of 16 tokens: three 40 + 30 token offline requests fill most of it.
        engine = make_engine(
            model_dir,
            num_kv_blocks=16,
            swap_space_gb=swap_space_gb,
            async_scheduling=async_scheduling,
        )
        for i, prompt in enumerate(offline_prompts):
            engine.add_request(f"off{i}", prompt, greedy(30), priority=1)
        outputs: dict[str, list[int]] = {}
        for n in range(1000):
            if not engine.has_unfinished():
                break
            if with_burst and n == 5:
                for i, prompt in enumerate(online_prompts):
                    engine.add_request(f"on{i}", prompt, greedy(8))
            for delta in engine.step():
                outputs.setdefault(delta.request_id, []).extend(delta.token_ids)
        return engine, outputs

    _, alone = run(with_burst=False)
    engine, mixed = run(with_burst=True)
    stats = engine.preemption_stats()
    assert stats.num_swap_outs > 0 and stats.swap_out_blocks > 0
    assert stats.swap_in_blocks == stats.swap_out_blocks  # every swapped block came back
    for i in range(3):
        assert mixed[f"off{i}"] == alone[f"off{i}"]
        assert len(mixed[f"on{i}"]) == 8
    assert engine.block_manager.num_free_blocks == 16
    assert len(engine.scheduler.free_host_blocks) == engine.swap_space.num_blocks
    _, recomputed = run(with_burst=True, swap_space_gb=0.0)  # no host room: recompute
    assert all(recomputed[f"off{i}"] == alone[f"off{i}"] for i in range(3))


def test_offline_prompt_chunks_beside_online_work_stay_within_the_offline_budget():
    s = make(num_blocks=64, budget=64)
    s.add(seq("online", 8, max_tokens=50))
    step(s)  # the online prompt, alone
    s.add(seq("offline", 40, priority=1, base=1))
    out = s.schedule(offline_budget=5)
    chunks = {item.seq.request_id: item.num_new_tokens for item in out.scheduled}
    assert chunks == {"online": 1, "offline": 5}  # not the 40 the token budget leaves
    s.update(out, {x.seq.seq_id: 7 for x in out.scheduled if x.samples})
    s.finish(s.running[0], None)  # the online request ends
    out = s.schedule(offline_budget=5)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("offline", 35)]


def test_the_offline_budget_prices_a_share_of_a_decode_step_in_prefill_tokens():
    from xllm.engine.scheduler import offline_token_budget

    assert offline_token_budget(0.5, 0.020, 0.0001) == 100  # 10 ms of prompt at 0.1 ms each
    assert offline_token_budget(0.0, 0.020, 0.0001) == 0
    assert offline_token_budget(0.5, 0.0, 0.0001) is None  # nothing measured yet
