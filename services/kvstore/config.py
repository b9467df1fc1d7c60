"""KvStoreConfig: the kvstore service's options."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.config import option


@dataclass(frozen=True)
class KvStoreConfig:
    heartbeat_timeout: float = option(
        2.0, "Seconds without a heartbeat before an instance's blocks leave the index."
    )
    key_prefix: str = option("xllm:kv:", "Prefix of every Redis key the index uses.")
    snapshot_interval: float = option(
        1.0, "Minimum seconds between two snapshot requests to the same instance."
    )

    def validate(self) -> None:
        if self.heartbeat_timeout <= 0:
            raise ValueError("--heartbeat-timeout must be positive")
        if self.snapshot_interval < 0:
            raise ValueError("--snapshot-interval cannot be negative")
