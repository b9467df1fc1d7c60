"""What the engine's load-or-recompute choice assumes of each tier's bandwidth: the hardware
profile's (`--cost-profile`, the scheduler's numbers for the same hardware), a `--*-kv-gbps`
flag where one is set, and the scheduler's unprofiled bandwidths without either."""

from __future__ import annotations

import pytest

from xllm.config import EngineConfig
from xllm.engine.kv_tier_setup import tier_gbps
from xllm.hardware import SPEC_PROFILES, UNPROFILED_TIER_BANDWIDTH, load_profile

TIERS = ("host", "disk", "store")


def test_without_a_profile_the_schedulers_unprofiled_bandwidths():
    assert tier_gbps(EngineConfig()) == {t: UNPROFILED_TIER_BANDWIDTH[t] / 1e9 for t in TIERS}


@pytest.mark.parametrize("name", ["a100", "cpu-local"])  # a spec sheet; a fitted JSON file
def test_a_profile_gives_every_tier_its_bandwidth(name):
    profile = load_profile(name)
    expected = {t: b / 1e9 for t, b in profile.tier_bandwidth().items() if t in TIERS}
    assert tier_gbps(EngineConfig(cost_profile=name)) == expected


def test_a_flag_overrides_the_profile_for_its_tier_only():
    a100 = SPEC_PROFILES["a100"]
    got = tier_gbps(EngineConfig(cost_profile="a100", host_kv_gbps=3.0))
    assert got == {"host": 3.0, "disk": a100.disk_kv_bw / 1e9, "store": a100.interconnect_bw / 1e9}


def test_an_unknown_profile_is_an_error():
    with pytest.raises(ValueError, match="no hardware profile"):
        tier_gbps(EngineConfig(cost_profile="no-such-gpu"))


def test_xllm_up_gives_its_instances_the_schedulers_profile():
    from xllm.cli.cluster import ClusterConfig, service_specs

    config = ClusterConfig(prefill=1, decode=1, cost_profile="a100", cost_model="qwen3-8b")
    specs = {s.name: s.argv for s in service_specs(config, "/m")}
    for name in ("prefill-0", "decode-0"):
        argv = specs[name]
        assert argv[argv.index("--cost-profile") + 1] == "a100"
