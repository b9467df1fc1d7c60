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
    host_kv_gb: float = option(
        0.0,
        "Host-memory KV tier, in GiB: every cached prefix block is also copied here, so one "
        "evicted from the KV pool is loaded back instead of recomputed; at least the pool's "
        "size; 0 = off (no tiers).",
    )
    disk_kv_dir: str = option(
        "", "Folder of the disk KV tier (blocks evicted from host memory); '' = no disk tier."
    )
    disk_kv_gb: float = option(4.0, "Size of the disk KV tier, in GiB.")
    host_kv_gbps: float = option(
        0.0,
        "Host tier -> KV pool bandwidth (GB/s) the load-or-recompute choice assumes; 0 = "
        "--cost-profile's.",
    )
    disk_kv_gbps: float = option(
        0.0,
        "Disk tier -> host bandwidth (GB/s) the load-or-recompute choice assumes; 0 = "
        "--cost-profile's.",
    )
    kv_store_master: str = option(
        "",
        "host:port of the Mooncake Store master: the cluster KV tier (full prefix blocks put "
        "there are fetched by any instance); needs --host-kv-gb; '' = off.",
    )
    kv_store_host: str = option(
        "127.0.0.1",
        "This instance's address as other Mooncake Store clients reach it; '' = the address "
        "its hostname resolves to (containers).",
    )
    kv_store_segment_gb: float = option(
        1.0, "Memory this instance lends to Mooncake Store for its objects, in GiB."
    )
    kv_store_put_min_reuse: int = option(
        0,
        "Which blocks go to the store: 0 = every full prefix block cached; N = a block once "
        "N requests have reused it (eager put of hot prefixes).",
    )
    kv_store_replicas: int = option(
        1,
        "Copies of each block the store keeps, in different instances' segments: with 2, "
        "the KV of a request whose instance dies survives for the instance resuming it.",
    )
    kv_store_gbps: float = option(
        0.0,
        "Store -> host bandwidth (GB/s) the load-or-recompute choice assumes; 0 = "
        "--cost-profile's (its link between instances).",
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
    max_encode_batch: int = option(
        4,
        "Models that take images: images a step encodes at most, counting those its prefill "
        "chunks reach; the room left encodes waiting requests' images ahead of their "
        "prefill (engine/encode_ahead.py); 0 = only the images a chunk reaches.",
    )
    max_encode_tokens: int = option(
        0, "Image tokens (embedding rows) one step's encodes make at most; 0 = no limit."
    )
    enable_prefix_caching: bool = option(True, "Reuse the KV of cached prompt prefixes.")
    seed: int = option(0, "Seed of the sampler's global generator.")
    num_threads: int = option(0, "CPU threads for torch; 0 = torch's default (one per core).")
    native_kernels: bool = option(
        True,
        "Use our native CPU kernels where the CPU has what they need (AMX, AVX512-BF16 or "
        "AVX2 + FMA); "
        "off = torch's own ops only.",
    )
    speculative: str = option(
        "",
        "Speculative decoding: '' (off), ngram (prompt lookup: drafts copied from the "
        "sequence's own earlier tokens), suffix (the likeliest continuation in a suffix "
        "trie of the sequence's tokens) or draft (a smaller model, --draft-model).",
    )
    draft_model: str = option(
        "",
        "Checkpoint folder of the draft model for --speculative draft: any smaller model "
        "with the target's vocabulary.",
    )
    num_speculative_tokens: int = option(4, "Most draft tokens verified per sequence per step.")
    ngram_max: int = option(
        4, "Longest n-gram the ngram proposer matches (vLLM's prompt_lookup_max)."
    )
    ngram_min: int = option(
        2, "Shortest n-gram the ngram proposer matches (vLLM's prompt_lookup_min)."
    )
    suffix_max_match: int = option(
        8, "Longest suffix of the sequence the suffix proposer matches in its trie."
    )
    suffix_min_probability: float = option(
        0.1,
        "The suffix proposer's draft stops where its estimated chance of being accepted "
        "whole (product of the continuation frequencies) falls below this.",
    )
    suffix_cache_nodes: int = option(
        0,
        "Size (trie nodes) of the suffix proposer's trie of recent outputs of every request, "
        "asked where a request's own tokens have no continuation; 0 = none.",
    )
    speculative_adaptive: bool = option(
        True,
        "Decide every step, from measured acceptance and step times, whether speculation "
        "pays at the current batch size; false = speculate whenever there are drafts.",
    )
    item_trie: str = option(
        "",
        "Item tries for constrained beam search, NAME=PATH[,NAME=PATH...]: the token id "
        "sequences a request naming the trie (`item_trie`) may produce; PATH is a JSON array "
        "of token id arrays (.json) or one item a line, ids separated by spaces.",
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
    graph_mode: bool = option(
        False,
        "Decode-only steps without per-op Python and dispatch (engine/graph_runner.py): one "
        "native call per step on CPU, a CUDA/NPU graph replayed per padded batch-size bucket "
        "on accelerators; built at start-up, eager (logged) where it cannot be.",
    )
    cost_profile: str = option(
        "",
        "Hardware profile (built-in name or JSON, as the scheduler's) whose tier bandwidths "
        "the load-or-recompute choice assumes where --host/disk-kv-gbps and --kv-store-gbps "
        "are 0; '' = 10 GB/s host, 1 GB/s disk, 1.25 GB/s store.",
    )
    kv_store_audit_seconds: float = option(
        10.0,
        "Every this many seconds, ask the store which of the blocks this instance put there "
        "it still holds, and report the others as evicted (KV events); 0 = never.",
    )
    async_scheduling: bool = option(
        False,
        "Schedule step N+1 (blocks, batch, input tensors) while step N's forward pass runs "
        "on a second thread, its sampled tokens filled in when it ends (report §4.1; vLLM's "
        "flag). Steps with speculation, beams, grammars or forks, and every step with "
        "--speculative or KV tiers, run synchronously.",
    )

    def item_trie_paths(self) -> dict[str, str]:
        """--item-trie as name -> path; ValueError if malformed."""
        paths: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in self.item_trie.split(","))):
            name, sep, path = entry.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"--item-trie entries are NAME=PATH, got {entry!r}")
            paths[name.strip()] = path.strip()
        return paths

    def validate(self) -> None:
        checks = [
            (self.block_size > 0, "--block-size must be positive"),
            (self.num_redundant_experts >= 0, "--num-redundant-experts must be >= 0"),
            (self.eplb_interval >= 0, "--eplb-interval must be >= 0"),
            (self.expert_parallel_size > 0, "--expert-parallel-size must be positive"),
            (self.max_num_seqs > 0, "--max-num-seqs must be positive"),
            (self.max_num_batched_tokens > 0, "--max-num-batched-tokens must be positive"),
            (self.max_encode_batch >= 0, "--max-encode-batch cannot be negative"),
            (self.max_encode_tokens >= 0, "--max-encode-tokens cannot be negative"),
            (self.swap_space_gb >= 0, "--swap-space-gb cannot be negative"),
            (self.offline_step_share >= 0, "--offline-step-share cannot be negative"),
            (self.host_kv_gb >= 0 and self.disk_kv_gb >= 0, "KV tier sizes cannot be negative"),
            (
                not self.disk_kv_dir or self.host_kv_gb > 0,
                "--disk-kv-dir needs --host-kv-gb (disk holds what host memory evicts)",
            ),
            (
                not self.kv_store_master or self.host_kv_gb > 0,
                "--kv-store-master needs --host-kv-gb (blocks from the store land there first)",
            ),
            (self.kv_store_put_min_reuse >= 0, "--kv-store-put-min-reuse cannot be negative"),
            (self.kv_store_replicas >= 1, "--kv-store-replicas must be at least 1"),
            (self.kv_store_audit_seconds >= 0, "--kv-store-audit-seconds cannot be negative"),
            (
                min(self.host_kv_gbps, self.disk_kv_gbps, self.kv_store_gbps) >= 0,
                "tier bandwidths cannot be negative (0 = --cost-profile's)",
            ),
            (
                self.kv_cache_gb > 0 or self.num_kv_blocks > 0,
                "give --kv-cache-gb or --num-kv-blocks",
            ),
            (
                self.speculative in ("", "ngram", "suffix", "draft"),
                f"--speculative must be '' (off), ngram, suffix or draft, got {self.speculative!r}",
            ),
            (
                (self.speculative == "draft") == bool(self.draft_model),
                "--speculative draft needs --draft-model, and --draft-model needs it",
            ),
            (self.num_speculative_tokens > 0, "--num-speculative-tokens must be positive"),
            (self.suffix_max_match >= 1, "--suffix-max-match must be at least 1"),
            (self.suffix_cache_nodes >= 0, "--suffix-cache-nodes cannot be negative"),
            (
                0 <= self.suffix_min_probability <= 1,
                "--suffix-min-probability must be in [0, 1]",
            ),
            (
                1 <= self.ngram_min <= self.ngram_max,
                "--ngram-min must be at least 1 and at most --ngram-max",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        self.item_trie_paths()


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


FLIP_HYSTERESIS = 20.0
"""slo-pd's default role-flip hysteresis in predicted service times (`--flip-hysteresis`, of
the scheduler and `xllm up`): the sweep in benchmarks/README.md ("SLO-aware PD on every
mix") found goodput flat from 0 to 80; 20 keeps a role for about the 3 s cooldown of
earlier runs on an A100 (a 2,000-token prompt prefills in ~0.17 s)."""


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
