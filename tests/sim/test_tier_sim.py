"""`xllm sim` with KV tiers: instances whose device pool is too small for the working set
keep evicted prefixes in host memory (and the cluster store), load them back instead of
recomputing, and cache-aware prices each candidate by where its prefix is — the live
policy's `tier_cost.prefix_work`, with the hardware profile's bandwidths."""

from __future__ import annotations

import dataclasses

from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import get_policy
from services.scheduler.sim.instance import InstanceSpec, SimRequest
from services.scheduler.sim.simulator import ClusterSpec, Simulator
from xllm.hardware import SPEC_PROFILES

MODEL = load_model_config("qwen3-8b")
HW = SPEC_PROFILES["a100"]
# 200 blocks of 16 = 3200 tokens: one 2048-token prefix and its request, not two.
DEVICE_ONLY = InstanceSpec(num_kv_blocks=200, block_size=16, max_num_batched_tokens=2048)


def workload() -> list[SimRequest]:
    """Six 2048-token prefixes (4 trace blocks each), asked in turn three times, a request
    each 150 ms: about one prefill's time, so both instances get work."""
    prefixes = [tuple(range(10 * p, 10 * p + 4)) for p in range(6)]
    order = [p for _ in range(3) for p in range(6)]
    return [SimRequest(f"r{i}", 0.15 * i, 2100, 2, prefixes[p]) for i, p in enumerate(order)]


def run(spec: InstanceSpec) -> tuple[list[SimRequest], Simulator]:
    sim = Simulator(
        MODEL, HW, ClusterSpec.colocated(2, spec), get_policy("cache-aware"), uses_prefix_hits=True
    )
    return sim.run(workload()), sim


def mean_ttft(done: list[SimRequest]) -> float:
    return sum(r.first_token_at - r.arrival for r in done) / len(done)


def test_cache_aware_with_host_and_store_tiers_beats_device_only_on_a_prefix_workload():
    base, base_sim = run(DEVICE_ONLY)
    host, host_sim = run(dataclasses.replace(DEVICE_ONLY, num_host_kv_blocks=4096))
    store, store_sim = run(dataclasses.replace(DEVICE_ONLY, kv_store=True))
    for done in (base, host, store):
        assert all(r.finished_at is not None for r in done)
    # Device only: a pool holds one prefix, and the next request evicts it: no hits.
    assert sum(r.num_cached_tokens for r in base) == 0
    assert base_sim.instances[0].tiers is None
    # Host memory keeps every prefix an instance computed: its repeats placed there load
    # it back (cache-aware prices the host copy), the others recompute.
    assert sum(r.num_cached_tokens for r in host) >= 4 * 2048
    assert sum(i.tiers.loaded["host"] for i in host_sim.instances) > 0
    assert mean_ttft(host) < 0.8 * mean_ttft(base)
    # The cluster store serves every repeat, wherever it is placed: both instances fetch
    # prefixes (some computed by the other).
    assert sum(r.num_cached_tokens for r in store) == 12 * 2048
    assert all(i.tiers.loaded["store"] > 0 for i in store_sim.instances)
    assert mean_ttft(store) < 0.8 * mean_ttft(host)


def test_the_sim_prices_placements_with_the_profiles_bandwidths():
    seen = []

    def spy(request, snapshot):
        seen.append(request)
        return get_policy("cache-aware")(request, snapshot)

    spec = dataclasses.replace(DEVICE_ONLY, num_host_kv_blocks=4096, kv_store=True)
    sim = Simulator(MODEL, HW, ClusterSpec.colocated(2, spec), spy, uses_prefix_hits=True)
    sim.run(workload()[:7])
    assert all(r.tier_bandwidth == HW.tier_bandwidth() for r in seen)
    # Request 6 repeats request 0's prefix: in the store (127 blocks of 16 past which the
    # own tokens start), and on one instance's device or host.
    assert seen[6].store_blocks == 2048 // 16
    (tiers,) = [t for t in seen[6].prefix_tiers.values() if sum(t.values()) == 2048 // 16]
    assert set(tiers) <= {"device", "host"}
