"""Configuration: frozen dataclasses whose fields are the options, defined once each.

Every field becomes a CLI flag (`--max-num-seqs`) and an environment variable
(`XLLM_MAX_NUM_SEQS`); precedence is flag > environment > default. The field's docstring
(the `help` metadata) is the flag's help text. Services compose these classes; nothing
else reads `os.environ`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")
ENV_PREFIX = "XLLM_"


def option(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def env_name(field_name: str) -> str:
    return ENV_PREFIX + field_name.upper()


def _parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"not a boolean: {text!r}")


def _converter(tp: Any):
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    if tp in (int | None, "int | None"):
        return int
    return str


def add_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of dataclass `cls`; defaults come from the environment."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        convert = _converter(hints[f.name])
        flag = "--" + f.name.replace("_", "-")
        env = os.environ.get(env_name(f.name))
        default = convert(env) if env is not None else f.default
        help_text = f"{f.metadata.get('help', '')} [env {env_name(f.name)}; default {default!r}]"
        if hints[f.name] is bool:
            parser.add_argument(
                flag, type=_parse_bool, nargs="?", const=True, default=default, help=help_text
            )
        else:
            parser.add_argument(flag, type=convert, default=default, help=help_text)


def from_args(cls: type[T], args: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def from_env(cls: type[T], **overrides: Any) -> T:
    """Build `cls` from defaults and XLLM_* variables (for code that has no CLI)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser, cls)
    config = from_args(cls, parser.parse_args([]))
    return dataclasses.replace(config, **overrides)  # type: ignore[type-var]


@dataclass(frozen=True)
class EngineConfig:
    model: str = option("", "Hugging Face model folder (config.json + safetensors + tokenizer).")
    dtype: str = option(
        "auto", "Weights and KV dtype: auto (the checkpoint's), bfloat16, float16, float32."
    )
    device: str = option("auto", "auto, cpu, cuda or npu.")
    block_size: int = option(16, "Tokens per KV block.")
    kv_cache_gb: float = option(2.0, "Memory for the KV pool, in GiB.")
    num_kv_blocks: int = option(0, "KV blocks in the pool; overrides --kv-cache-gb when positive.")
    max_num_seqs: int = option(64, "Most sequences in one batch.")
    swap_space_gb: float = option(
        1.0,
        "Host memory for the KV of preempted offline requests, in GiB (committed only as "
        "it is used); 0 = preempted offline requests are recomputed.",
    )
    offline_step_share: float = option(
        0.2,
        "While online requests run, offline work may lengthen a step by at most this share "
        "of a decode step's time (priced at the measured prefill cost per token); 0 = "
        "offline work waits for online work to finish.",
    )
    max_num_batched_tokens: int = option(
        2048, "Token budget of one step (prefill chunks + decodes)."
    )
    max_model_len: int = option(
        0, "Longest prompt + output; 0 = the model's max_position_embeddings."
    )
    enable_prefix_caching: bool = option(True, "Reuse the KV of cached prompt prefixes.")
    seed: int = option(0, "Seed of the sampler's global generator.")
    num_threads: int = option(0, "CPU threads for torch; 0 = torch's default (one per core).")
    native_kernels: bool = option(
        True,
        "Use our native CPU kernels where the CPU has what they need (AVX512-BF16, AMX); "
        "off = torch's own ops only.",
    )
    speculative: str = option(
        "",
        "Speculative decoding: '' (off) or ngram (prompt lookup: drafts copied from the "
        "sequence's own earlier tokens).",
    )
    num_speculative_tokens: int = option(4, "Most draft tokens verified per sequence per step.")
    ngram_max: int = option(
        4, "Longest n-gram the ngram proposer matches (vLLM's prompt_lookup_max)."
    )
    ngram_min: int = option(
        2, "Shortest n-gram the ngram proposer matches (vLLM's prompt_lookup_min)."
    )
    speculative_adaptive: bool = option(
        True,
        "Decide every step, from measured acceptance and step times, whether speculation "
        "pays at the current batch size; false = speculate whenever there are drafts.",
    )
    num_redundant_experts: int = option(
        0,
        "MoE models: extra physical expert slots per layer for copies of hot experts (EPLB); "
        "0 = one slot per expert, placement fixed.",
    )
    eplb_interval: int = option(
        64,
        "MoE models: steps per expert-load window: each window's max/mean tokens per expert "
        "copy is measured and, with redundant slots, may trigger a re-placement; 0 = never.",
    )
    expert_parallel_size: int = option(
        1,
        "MoE models: ranks the expert slots are split over (torch.distributed, one process "
        "per rank, initialised by the launcher); 1 = all experts here.",
    )

    def validate(self) -> None:
        checks = [
            (self.block_size > 0, "--block-size must be positive"),
            (self.num_redundant_experts >= 0, "--num-redundant-experts must be >= 0"),
            (self.eplb_interval >= 0, "--eplb-interval must be >= 0"),
            (self.expert_parallel_size > 0, "--expert-parallel-size must be positive"),
            (self.max_num_seqs > 0, "--max-num-seqs must be positive"),
            (self.max_num_batched_tokens > 0, "--max-num-batched-tokens must be positive"),
            (self.swap_space_gb >= 0, "--swap-space-gb cannot be negative"),
            (self.offline_step_share >= 0, "--offline-step-share cannot be negative"),
            (
                self.kv_cache_gb > 0 or self.num_kv_blocks > 0,
                "give --kv-cache-gb or --num-kv-blocks",
            ),
            (
                self.speculative in ("", "ngram"),
                f"--speculative must be '' (off) or ngram, got {self.speculative!r}",
            ),
            (self.num_speculative_tokens > 0, "--num-speculative-tokens must be positive"),
            (
                1 <= self.ngram_min <= self.ngram_max,
                "--ngram-min must be at least 1 and at most --ngram-max",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(frozen=True)
class SloConfig:
    """The online latency targets, shared by the services that act on them (the scheduler
    places and admits by them; the gateway counts how often they were met)."""

    slo_ttft: float = option(
        0.0,
        "Online time-to-first-token target in seconds (slo-pd placement, SLO admission, "
        "the gateway's attainment counters); 0 = none.",
    )
    slo_tpot: float = option(
        0.0,
        "Online time-per-output-token target in seconds (slo-pd placement, offline decode "
        "admission, the gateway's attainment counters); 0 = none.",
    )


@dataclass(frozen=True)
class NatsConfig:
    nats_url: str = option("nats://127.0.0.1:4222", "NATS server URL(s), comma-separated.")
    nats_connect_timeout: float = option(30.0, "Seconds to keep retrying the first connection.")


@dataclass(frozen=True)
class RedisConfig:
    redis_url: str = option(
        "redis://127.0.0.1:6379/0", "Redis (or Valkey) URL for global KV metadata."
    )


@dataclass(frozen=True)
class LogConfig:
    log_level: str = option("INFO", "Logging level: DEBUG, INFO, WARNING, ERROR.")
