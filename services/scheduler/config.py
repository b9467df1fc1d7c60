"""SchedulerConfig: the scheduler service's options."""

from __future__ import annotations

from dataclasses import dataclass

from xllm.config import FLIP_HYSTERESIS, SloConfig, option


@dataclass(frozen=True)
class SchedulerConfig(SloConfig):
    """The scheduler's options; the SLO targets (`SloConfig`) come first."""

    policy: str = option(
        "cache-aware", "Placement policy: round-robin, least-load, cache-aware, slo-pd."
    )
    heartbeat_timeout: float = option(
        2.0, "Seconds without a heartbeat before an instance leaves the rotation."
    )
    encode_timeout: float = option(
        2.0,
        "Seconds to wait for an encoder instance's embeddings before the prompt's instance "
        "encodes the images itself; keep it under the gateway's --submit-timeout (the "
        "submit waits for the encode step).",
    )
    kv_match_timeout: float = option(
        0.05, "Seconds to wait for the kvstore's prefix match before placing without it."
    )
    slo_admission: float = option(
        0.0,
        "Refuse (429) an online request whose predicted TTFT is beyond this many times "
        "--slo-ttft on every instance, instead of queueing it to a certain miss; 0 = admit "
        "all (1.5 is a safe margin over the predictor's error).",
    )
    min_decode_instances: int = option(
        2, "slo-pd: decode instances never flipped to prefill (the report keeps two)."
    )
    flip_cooldown: float = option(
        0.0, "slo-pd: seconds (at least) an instance keeps a role after a flip."
    )
    flip_idle: float = option(
        0.0, "slo-pd: seconds (at least) with no queued prefill before a prefill instance is idle."
    )
    flip_hysteresis: float = option(
        FLIP_HYSTERESIS,
        "slo-pd: the flip cooldown and idle time in predicted service times (a typical "
        "prompt's prefill), so they scale with model and hardware; the larger of this and "
        "--flip-cooldown / --flip-idle counts.",
    )
    cost_profile: str = option(
        "",
        "Hardware profile (built-in name or JSON) of the instances, with --cost-model: offline "
        "decodes then join decode instances while the predicted step keeps --slo-tpot; "
        "without both, offline decodes stay on the prefill instance (PD clusters).",
    )
    cost_model: str = option(
        "", "Model config (built-in name, folder or config.json) for --cost-profile."
    )

    def validate(self) -> None:
        checks = [
            (self.slo_ttft >= 0 and self.slo_tpot >= 0, "--slo-ttft/--slo-tpot cannot be negative"),
            (self.slo_admission == 0 or self.slo_admission >= 1, "--slo-admission is 0 or >= 1"),
            (self.slo_admission == 0 or self.slo_ttft > 0, "--slo-admission needs --slo-ttft"),
            (self.min_decode_instances >= 1, "--min-decode-instances must be at least 1"),
            (self.flip_cooldown >= 0, "--flip-cooldown cannot be negative"),
            (self.flip_idle >= 0, "--flip-idle cannot be negative"),
            (self.flip_hysteresis >= 0, "--flip-hysteresis cannot be negative"),
            (self.encode_timeout > 0, "--encode-timeout must be positive"),
            (
                bool(self.cost_profile) == bool(self.cost_model),
                "--cost-profile and --cost-model go together",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
