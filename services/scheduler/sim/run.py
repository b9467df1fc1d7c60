"""From a trace and options to simulated requests, and one policy's run to a report."""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, replace

from services.scheduler.config import SchedulerConfig
from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import (
    POLICIES_FLIPPING_ROLES,
    POLICIES_USING_PREFIX_HITS,
    get_policy,
)
from services.scheduler.rebalance import flip_config
from services.scheduler.sim.backlog import OfflineBacklog, sharegpt_backlog
from services.scheduler.sim.instance import InstanceSpec, SimRequest
from services.scheduler.sim.report import SimReport, Slo, summarize
from services.scheduler.sim.serving import ServingOverheads
from services.scheduler.sim.simulator import ClusterSpec, Simulator
from xllm.cli.bench.traces import TraceRequest, load_trace
from xllm.hardware import GiB, HardwareProfile, load_profile
from xllm.models.config import ModelConfig


@dataclass(frozen=True, slots=True)
class OfflineSpec:
    """`backlog.sharegpt_backlog`'s arguments and the number submitted at once."""

    num_requests: int
    output_len: tuple[int, int] = (256, 256)
    input_len: int = 0
    """Prompt tokens each; 0 = ShareGPT prompt lengths."""
    concurrency: int = 64
    """Offline requests in flight at once (live: the offline workers'); 0 = all at t = 0."""

    def backlog(self) -> OfflineBacklog:
        requests = sharegpt_backlog(self.num_requests, self.output_len, self.input_len)
        return OfflineBacklog(requests, self.concurrency)


@dataclass(frozen=True)
class Setup:
    """Everything a run depends on except the policy."""

    trace: tuple[TraceRequest, ...]
    trace_name: str
    model: ModelConfig
    hw: HardwareProfile
    cluster: ClusterSpec
    slo: Slo
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """The scheduler's options (its SLO targets are `slo`'s, its policy each run's)."""
    offline: OfflineSpec | None = None
    """An offline backlog beside the trace (None: online only)."""

    @property
    def num_instances(self) -> int:
        return len(self.cluster.roles)

    def describe(self) -> str:
        spec = self.cluster.instance
        roles = ",".join(sorted(set(self.cluster.roles)))
        return (
            f"trace {self.trace_name}: {len(self.trace)} requests over "
            f"{self.trace[-1].arrival - self.trace[0].arrival:.0f} s; instances ({roles}) on "
            f"{self.hw.name}; KV pool {spec.num_kv_blocks * spec.block_size} tokens each; "
            f"SLO TTFT <= {self.slo.ttft} s, TPOT <= {self.slo.tpot} s{self._offline()}"
        )

    def _offline(self) -> str:
        o = self.offline
        if o is None:
            return ""
        prompts = f"{o.input_len}-token" if o.input_len else "ShareGPT"
        return (
            f"; offline backlog of {o.num_requests} {prompts} prompts, "
            f"{o.output_len[0]}-{o.output_len[1]} output tokens, {o.concurrency or 'all'} at once"
        )

    def as_dict(self) -> dict:
        return {
            "trace": self.trace_name,
            "num_requests": len(self.trace),
            "profile": self.hw.name,
            "instances": len(self.cluster.roles),
            "roles": list(self.cluster.roles),
            "instance": asdict(self.cluster.instance),
            "overheads": asdict(self.cluster.overheads),
            "slo": asdict(self.slo),
            "scheduler": asdict(self.scheduler),
            "offline": None if self.offline is None else asdict(self.offline),
        }


def kv_tokens(model: ModelConfig, hw: HardwareProfile, kv_cache_gb: float = 0.0) -> int:
    """Tokens of KV one instance holds: the given GiB, the profile's pool, or 90% of memory
    minus the weights."""
    if kv_cache_gb > 0:
        budget = kv_cache_gb * GiB
    elif hw.kv_cache_bytes > 0:
        budget = hw.kv_cache_bytes
    else:
        weights = (
            model.num_hidden_layers * (model.attn_weights + model.mlp_weights(1 << 30)[1])
            + model.hidden_size * model.vocab_size
        ) * model.dtype_bytes
        budget = 0.9 * hw.memory_bytes - weights
    return int(budget // model.kv_bytes_per_token)


def roles_of(instances: int, pd: str) -> tuple[str, ...]:
    if not pd:
        return ("both",) * instances
    num_prefill, num_decode = (int(x) for x in pd.split(":"))
    return ("prefill",) * num_prefill + ("decode",) * num_decode


def setup_from_args(args: argparse.Namespace, instances: int) -> Setup:
    model = load_model_config(args.model_config, args.dtype)
    hw = load_profile(args.profile)
    tokens = kv_tokens(model, hw, args.kv_cache_gb)
    spec = InstanceSpec(
        num_kv_blocks=tokens // args.block_size,
        block_size=args.block_size,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=tokens // args.block_size * args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
        num_host_kv_blocks=int(args.host_kv_gb * GiB)
        // (model.kv_bytes_per_token * args.block_size),
        kv_store=args.kv_store,
    )
    trace = load_trace(
        args.trace,
        limit=args.limit,
        start=args.start,
        duration=args.duration,
        time_scale=args.time_scale,
        length_scale=args.length_scale,
    )
    if not trace:
        raise ValueError("the trace window holds no requests")
    overheads = ServingOverheads(
        args.request_overhead,
        args.prefill_hop,
        args.handoff_overhead,
        args.step_overhead,
        args.cores,
    )
    cluster = ClusterSpec(
        roles_of(instances, args.pd),
        spec,
        heartbeat_interval=args.heartbeat_interval,
        overheads=overheads,
    )
    scheduler = SchedulerConfig(
        slo_ttft=args.slo_ttft,
        slo_tpot=args.slo_tpot,
        min_decode_instances=args.min_decode_instances,
        flip_cooldown=args.flip_cooldown,
        flip_idle=args.flip_idle,
        flip_hysteresis=args.flip_hysteresis,
        slo_admission=args.slo_admission,
    )
    scheduler.validate()
    slo = Slo(args.slo_ttft, args.slo_tpot)
    offline = None
    if args.offline_backlog > 0:
        low, _, high = args.offline_output_len.partition(":")
        offline = OfflineSpec(
            args.offline_backlog,
            (int(low), int(high or low)),
            args.offline_input_len,
            args.offline_concurrency,
        )
    return Setup(tuple(trace), args.trace, model, hw, cluster, slo, scheduler, offline)


def to_requests(trace: tuple[TraceRequest, ...]) -> list[SimRequest]:
    return [
        SimRequest(f"r{i}", t.arrival, t.input_len, t.output_len, tuple(t.hash_ids))
        for i, t in enumerate(trace)
    ]


def simulator_for(setup: Setup, policy_name: str) -> Simulator:
    """The simulator as the live scheduler would run `policy_name` with `setup`'s options."""
    config = replace(
        setup.scheduler, policy=policy_name, slo_ttft=setup.slo.ttft, slo_tpot=setup.slo.tpot
    )
    return Simulator(
        setup.model,
        setup.hw,
        setup.cluster,
        get_policy(policy_name),
        uses_prefix_hits=policy_name in POLICIES_USING_PREFIX_HITS,
        targets=flip_config(config),
        flip_roles=policy_name in POLICIES_FLIPPING_ROLES,
    )


def simulate(setup: Setup, policy_name: str) -> SimReport:
    sim = simulator_for(setup, policy_name)
    backlog = None if setup.offline is None else setup.offline.backlog()
    requests = sim.run(to_requests(setup.trace), backlog=backlog)
    return summarize(policy_name, requests, sim.instances, setup.slo)
