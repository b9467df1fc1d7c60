"""InstanceConfig: the options of an instance process besides its engine's."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.config import option
from xllm.kv_transfer import BACKENDS


@dataclass(frozen=True)
class InstanceConfig:
    instance_id: str = option("", "Cluster-unique id (a NATS subject token); empty = host-pid.")
    role: str = option(
        "",
        "prefill, decode or both (PD-colocated); empty = the service's own "
        "(prefill for services.prefill, decode for services.decode; both in-process).",
    )
    served_model_name: str = option(
        "", "The model name clients use; empty = the model folder's name."
    )
    serve_encode: bool = option(
        False,
        "Also serve the encode role (hybrid EPD's ED+P): EncodeRequests for endpoint "
        "`<instance-id>-encode`, run on this instance's own vision tower and engine thread.",
    )
    heartbeat_interval: float = option(0.25, "Seconds between load heartbeats.")
    kv_events_interval: float = option(
        0.2, "Seconds between batches of KV cache events sent to the kvstore."
    )
    kv_transfer_backend: str = option(
        "mooncake",
        "How KV blocks move between instances (PD disaggregation): mooncake (the Mooncake "
        "Transfer Engine, between processes) or loopback (within one process, for tests).",
    )
    kv_transfer_host: str = option(
        "",
        "Address peers reach this instance's Mooncake transfer engine at (PD disaggregation); "
        "empty = the address this host's name resolves to (a container's own IP in Compose).",
    )
    kv_transfer_timeout: float = option(
        120.0,
        "Seconds a decode instance holds blocks for a prefill instance that does not answer.",
    )

    def validate(self) -> None:
        if self.role not in ("", "prefill", "decode", "both"):
            raise ValueError(f"--role must be prefill, decode or both, not {self.role!r}")
        if self.kv_transfer_backend not in BACKENDS:
            raise ValueError(
                f"--kv-transfer-backend must be one of {', '.join(BACKENDS)}, "
                f"not {self.kv_transfer_backend!r}"
            )
        if self.heartbeat_interval <= 0:
            raise ValueError("--heartbeat-interval must be positive")
        if self.kv_events_interval <= 0:
            raise ValueError("--kv-events-interval must be positive")
