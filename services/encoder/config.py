"""EncoderConfig: the encoder service's options (the encode role's own, shared with
instances that encode too, are `xllm.encoder.config.EncodeRoleConfig`)."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.config import option


@dataclass(frozen=True)
class EncoderConfig:
    model: str = option("", "Qwen2-VL model folder (only its vision tower is loaded).")
    instance_id: str = option("", "Cluster-unique id (a NATS subject token); empty = host-pid.")
    served_model_name: str = option(
        "", "The model name clients use; empty = the model folder's name."
    )
    dtype: str = option("auto", "Tower dtype: auto (the checkpoint's), bfloat16, float32.")
    transfer_host: str = option(
        "", "Address readers reach this encoder's Mooncake engine at; empty = this host's."
    )
    heartbeat_interval: float = option(0.25, "Seconds between heartbeats.")

    def validate(self) -> None:
        if not self.model:
            raise ValueError("--model (or XLLM_MODEL) is required")
        if self.heartbeat_interval <= 0:
            raise ValueError("--heartbeat-interval must be positive")
