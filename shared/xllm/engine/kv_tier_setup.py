"""The KV tiers an `EngineConfig` asks for (kv_tiers.py), behind the engine's device pool."""

from __future__ import annotations

from xllm.config import EngineConfig
from xllm.engine.block_manager import BlockManager
from xllm.engine.kv_cache import KVCache
from xllm.engine.kv_tier_loads import DISK, HOST, STORE
from xllm.engine.kv_tiers import KvTiers
from xllm.hardware import load_profile, tier_bandwidth


def make_tiers(config: EngineConfig, kv: KVCache, block_manager: BlockManager) -> KvTiers:
    """The tiers `config` asks for (`--host-kv-gb` > 0), behind the pool `kv`."""
    per_block = kv.nbytes // kv.num_blocks
    num_host = int(config.host_kv_gb * 2**30) // per_block
    if num_host < kv.num_blocks:
        raise ValueError(
            f"--host-kv-gb holds {num_host} blocks, fewer than the KV pool's {kv.num_blocks}: "
            "host memory must hold every block cached on the device"
        )
    store = None
    if config.kv_store_master:
        from xllm.engine.kv_store import KvStore, namespace

        space = namespace(config.model, kv.tensor.dtype, kv.block_size)
        segment = int(config.kv_store_segment_gb * 2**30)
        store = KvStore(
            config.kv_store_master,
            config.kv_store_host,
            segment,
            space,
            config.kv_store_replicas,
        )
    return KvTiers(
        kv,
        block_manager,
        num_host,
        config.disk_kv_dir,
        int(config.disk_kv_gb * 2**30) // per_block,
        tier_gbps(config),
        store,
        config.kv_store_put_min_reuse,
        config.kv_store_audit_seconds,
    )


def tier_gbps(config: EngineConfig) -> dict[str, float]:
    """GB/s into the pool from each tier, as the load-or-recompute choice prices them: the
    `--*-kv-gbps` flags where set (> 0), else `--cost-profile`'s bandwidths (the scheduler's
    numbers for the same hardware), else the scheduler's unprofiled ones."""
    profile = load_profile(config.cost_profile) if config.cost_profile else None
    bandwidth = tier_bandwidth(profile)  # bytes/s
    flags = {HOST: config.host_kv_gbps, DISK: config.disk_kv_gbps, STORE: config.kv_store_gbps}
    return {tier: flag or bandwidth[tier] / 1e9 for tier, flag in flags.items()}
