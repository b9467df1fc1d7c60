"""Which processes make up a serving cluster, and with which command lines.

`ClusterConfig` holds the options of `xllm up` (each is a flag and an `XLLM_*` variable, see
`xllm.config`); `service_specs()` turns it into `ProcessSpec`s, in start order:

* `python -m services.kvstore`, only when `services/kvstore/__main__.py` exists;
* `python -m services.scheduler --policy <policy>`, plus the SLO-aware PD options
  (`--slo-ttft`, `--slo-tpot`, `--min-decode-instances`, `--flip-cooldown`, `--flip-idle`)
  that differ from their defaults;
* PD-colocated: `--instances N` × `python -m services.decode --instance-id inst-<i> --role both`;
  disaggregated (`--prefill P --decode D`): P × `python -m services.prefill --instance-id
  prefill-<i>` and D × `python -m services.decode --instance-id decode-<i>`; extra engine
  flags (`engine_args`) go to every instance (with `--expert-parallel-size N`, each
  instance process starts its N-1 follower ranks itself: still one process to supervise);
* `--encode N` (hybrid EPD): N × `python -m services.encoder --instance-id encode-<i>`
  (the vision tower in the instances' `--dtype`), beside either of the above;
* `--encode-on decode` (ED+P; or `prefill`): those instances get `--serve-encode`, an
  encode endpoint `<id>-encode` in their own process. Without encoders or `--encode-on`,
  disaggregated prefill instances encode their own requests' images (EP+D);
* `python -m services.gateway --model DIR --host H --port PORT [--max-model-len N]` (the
  context length when the instances were given one; the API key, if any, in
  `XLLM_API_KEY`, so that it does not show in `ps`).

The rest reaches every service through the environment: `XLLM_MODEL`, `XLLM_LOG_LEVEL`, and
the `XLLM_NATS_URL` / `XLLM_REDIS_URL` (and, with `--kv-store`, `XLLM_KV_STORE_MASTER`)
that `Cluster` sets. `serving_cluster()` puts it
together; with no model it uses the tiny demo model from `demo_model()`, made once and cached.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from xllm.cli.cluster.launcher import Cluster, ProcessSpec, RestartPolicy
from xllm.config import FLIP_HYSTERESIS, SloConfig, option

DEMO_ARCH, DEMO_SIZE, DEMO_DTYPE = "qwen3", "tiny", "bfloat16"
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")


@dataclass(frozen=True)
class ClusterConfig(SloConfig):
    model: str = option("", "Model folder; empty = the tiny demo model (made once, cached).")
    host: str = option("0.0.0.0", "Address the gateway listens on.")
    port: int = option(8000, "Port the gateway listens on.")
    instances: int = option(1, "PD-colocated instances (role both), unless --prefill/--decode.")
    prefill: int = option(0, "Prefill instances (PD-disaggregated; give --decode too).")
    decode: int = option(0, "Decode instances (PD-disaggregated; give --prefill too).")
    encode: int = option(
        0, "Encoder instances (vision tower only, hybrid EPD): image requests encode there."
    )
    encode_on: str = option(
        "",
        "Instances that serve the encode role too (hybrid EPD without encoder services): "
        "decode (ED+P) or prefill; empty = none (prefill instances encode their own "
        "requests' images: EP+D).",
    )
    policy: str = option("cache-aware", "The scheduler's placement policy.")
    slo_admission: float = option(
        0.0, "Refuse (429) online requests predicted past this × --slo-ttft; 0 = admit all."
    )
    min_decode_instances: int = option(2, "slo-pd: decode instances never flipped to prefill.")
    flip_cooldown: float = option(0.0, "slo-pd: seconds (at least) a role is kept after a flip.")
    flip_idle: float = option(0.0, "slo-pd: seconds (at least) without prefill that count as idle.")
    flip_hysteresis: float = option(
        FLIP_HYSTERESIS, "slo-pd: the cooldown and idle time in predicted service times."
    )
    cost_profile: str = option(
        "",
        "Hardware profile (e.g. a100) for offline decode admission, with --cost-model; the "
        "instances' load-or-recompute choice takes its tier bandwidths.",
    )
    cost_model: str = option("", "Model config (e.g. qwen3-8b) for --cost-profile.")
    nats_url: str = option("", "NATS server URL; empty = start an embedded nats-server.")
    redis_url: str = option("", "Redis URL; empty = start an embedded Valkey.")
    kv_store: bool = option(
        False,
        "Run the cluster KV tier (Mooncake Store): start its master (unless "
        "--kv-store-master names one) and point every instance at it; give the instances "
        "--host-kv-gb too.",
    )
    kv_store_master: str = option("", "host:port of a running Mooncake Store master.")
    api_key: str = option("", "Key clients must send as a Bearer token; empty = no auth.")
    log_dir: str = option("", "Folder for the processes' logs; empty = a new temporary one.")
    log_level: str = option("INFO", "Logging level of every service.")
    ready_timeout: float = option(300.0, "Seconds to wait for the gateway's /health.")
    stop_grace: float = option(10.0, "Seconds the services get to drain before SIGKILL.")
    max_restarts: int = option(
        5,
        "Restarts of one process within --restart-window before it is given up on (the rest "
        "keep serving); 0 = any process exiting stops the whole cluster.",
    )
    restart_window: float = option(60.0, "Seconds over which --max-restarts is counted.")
    cache_dir: str = option("", "xLLM's cache folder (demo model); empty = ~/.cache/xllm.")

    def validate(self) -> None:
        checks = [
            (
                (self.prefill > 0) == (self.decode > 0),
                "give both --prefill and --decode, or neither",
            ),
            (self.prefill >= 0 and self.decode >= 0, "--prefill/--decode cannot be negative"),
            (self.encode >= 0, "--encode cannot be negative"),
            (self.encode_on in ENCODE_ON, "--encode-on must be decode, prefill or empty"),
            (
                not self.encode_on or self.prefill > 0,
                "--encode-on needs PD-disaggregated instances (--prefill P --decode D)",
            ),
            (self.instances > 0, "--instances must be positive"),
            (0 < self.port < 65536, "--port must be in 1..65535"),
            (self.ready_timeout > 0, "--ready-timeout must be positive"),
            (self.max_restarts >= 0, "--max-restarts cannot be negative"),
            (self.restart_window > 0, "--restart-window must be positive"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def num_instances(self) -> int:
        prompt_instances = self.prefill + self.decode if self.prefill or self.decode else None
        encode_endpoints = {"decode": self.decode, "prefill": self.prefill}.get(self.encode_on, 0)
        return (prompt_instances or self.instances) + self.encode + encode_endpoints

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the gateway (a wildcard is not an address)."""
        return "127.0.0.1" if self.host in _WILDCARD_HOSTS else self.host

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API root, e.g. `http://127.0.0.1:8000/v1`."""
        host = f"[{self.client_host}]" if ":" in self.client_host else self.client_host
        return f"http://{host}:{self.port}/v1"

    @property
    def restart_policy(self) -> RestartPolicy | None:
        if not self.max_restarts:
            return None
        return RestartPolicy(max_restarts=self.max_restarts, window=self.restart_window)

    @property
    def health_url(self) -> str:
        return self.base_url.removesuffix("/v1") + "/health"


def has_service(name: str) -> bool:
    """Whether `python -m services.<name>` can run (its package has a `__main__`)."""
    try:
        return importlib.util.find_spec(f"services.{name}.__main__") is not None
    except ImportError:  # no such package
        return False


def service_specs(
    config: ClusterConfig, model: str | Path, engine_args: Sequence[str] = ()
) -> list[ProcessSpec]:
    """The cluster's processes in start order (stopped in reverse: gateway first)."""

    def module(name: str, *args: str) -> list[str]:
        return [sys.executable, "-m", f"services.{name}", *args]

    specs = []
    if has_service("kvstore"):  # before the instances, so it sees their first KV events
        specs.append(ProcessSpec("kvstore", module("kvstore")))
    scheduler_args = ["--policy", config.policy, *_changed_flags(config, SCHEDULER_OPTIONS)]
    specs.append(ProcessSpec("scheduler", module("scheduler", *scheduler_args)))
    if config.prefill or config.decode:
        instances = [("prefill", f"prefill-{i}", ()) for i in range(config.prefill)]
        instances += [("decode", f"decode-{i}", ()) for i in range(config.decode)]
    else:
        instances = [("decode", f"inst-{i}", ("--role", "both")) for i in range(config.instances)]
    # The instances price tier loads with the scheduler's hardware profile too.
    profile_args = ("--cost-profile", config.cost_profile) if config.cost_profile else ()
    for service, instance_id, role_args in instances:
        served = (instance_id,)
        if service == config.encode_on:  # ED+P: its own tower also serves encodes
            role_args = (*role_args, "--serve-encode")
            served = (instance_id, f"{instance_id}-encode")
        argv = module(
            service, "--instance-id", instance_id, *role_args, *profile_args, *engine_args
        )
        specs.append(ProcessSpec(instance_id, argv, instance_ids=served))
    for i in range(config.encode):  # the vision tower in the instances' dtype
        argv = module(
            "encoder", "--instance-id", f"encode-{i}", *_flag_value(engine_args, "--dtype")
        )
        specs.append(ProcessSpec(f"encode-{i}", argv, instance_ids=(f"encode-{i}",)))
    gateway_args = ["--model", str(model), "--host", config.host, "--port", str(config.port)]
    gateway_args += _flag_value(engine_args, "--max-model-len")  # it checks prompt lengths too
    gateway_args += _changed_flags(config, GATEWAY_OPTIONS)
    gateway_env = {"XLLM_API_KEY": config.api_key} if config.api_key else {}
    specs.append(ProcessSpec("gateway", module("gateway", *gateway_args), gateway_env))
    return specs


ENCODE_ON = ("", "decode", "prefill")
"""`--encode-on` values: which PD role's instances serve the encode role too."""

SCHEDULER_OPTIONS = (
    "slo_ttft",
    "slo_tpot",
    "slo_admission",
    "min_decode_instances",
    "flip_cooldown",
    "flip_idle",
    "flip_hysteresis",
    "cost_profile",
    "cost_model",
)
"""`ClusterConfig` fields that are the scheduler's options of the same name."""

GATEWAY_OPTIONS = ("slo_ttft", "slo_tpot")
"""`ClusterConfig` fields that are the gateway's options of the same name (its SLO
attainment counters)."""


def _changed_flags(config: ClusterConfig, names: Sequence[str]) -> list[str]:
    """`--name value` for each field in `names` whose value is not its default."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    flags: list[str] = []
    for name in names:
        value = getattr(config, name)
        if value != defaults[name]:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def _flag_value(args: Sequence[str], flag: str) -> list[str]:
    """`[flag, value]` if `args` contains `flag value`, else `[]`."""
    args = list(args)
    return [flag, args[args.index(flag) + 1]] if flag in args[:-1] else []


def serving_cluster(config: ClusterConfig, engine_args: Sequence[str] = ()) -> Cluster:
    """A `Cluster` running every service for `config` (not started yet)."""
    config.validate()
    if (
        (config.kv_store or config.kv_store_master)
        and "--host-kv-gb" not in engine_args
        and not os.environ.get("XLLM_HOST_KV_GB")
    ):
        raise ValueError("--kv-store needs --host-kv-gb for the instances (blocks land there)")
    expert_parallel = _flag_value(engine_args, "--expert-parallel-size")
    if expert_parallel and int(expert_parallel[1]) > 1 and (config.prefill or config.encode_on):
        raise ValueError("--expert-parallel-size > 1 serves PD-colocated instances only")
    model = Path(config.model).resolve() if config.model else demo_model(config.cache_dir)
    return Cluster(
        service_specs(config, model, engine_args),
        env={"XLLM_MODEL": str(model), "XLLM_LOG_LEVEL": config.log_level},
        log_dir=config.log_dir or None,
        health_url=config.health_url,
        instances=config.num_instances,
        nats_url=config.nats_url or None,
        redis_url=config.redis_url or None,
        kv_store=config.kv_store or bool(config.kv_store_master),
        kv_store_master=config.kv_store_master or None,
        grace=config.stop_grace,
        restart=config.restart_policy,
    )


def demo_model(cache_dir: str | Path = "") -> Path:
    """The tiny random-weight demo model, made on first use under `<cache_dir>/models/`."""
    root = Path(cache_dir) if cache_dir else Path.home() / ".cache" / "xllm"
    out = root / "models" / f"{DEMO_ARCH}-{DEMO_SIZE}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    from xllm.cli.commands.make_model import make_model  # imports torch: only when needed

    # Made beside its final place and renamed into it, so that an interrupted run (or a
    # concurrent one) never leaves a half-written model that later runs would trust.
    partial = out.with_name(f"{out.name}.partial-{os.getpid()}")
    try:
        make_model(DEMO_ARCH, DEMO_SIZE, partial, dtype=DEMO_DTYPE)
        partial.rename(out)
    except OSError:
        if not (out / "model.safetensors").is_file():
            raise
        # Another process got there first: use theirs.
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # no-op once renamed
    return out
