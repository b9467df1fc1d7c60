"""SchedulerConfig: the scheduler service's options."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.config import option


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = option("cache-aware", "Placement policy: round-robin, least-load, cache-aware.")
    heartbeat_timeout: float = option(
        2.0, "Seconds without a heartbeat before an instance leaves the rotation."
    )
    kv_match_timeout: float = option(
        0.05, "Seconds to wait for the kvstore's prefix match before placing without it."
    )
