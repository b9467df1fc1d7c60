"""The gateway's Prometheus metrics (on services.gateway.prometheus' registry), served at GET /metrics.

Gateway-side: requests by endpoint and status, generation requests in flight, time to first
token, time per output token, end-to-end latency, prompt and generated token counts, and
online requests within the SLO targets (`SloConfig`: attainment).
Cluster-side, refreshed from the scheduler's `ClusterState` at each scrape: running and
waiting sequences and KV blocks per instance, role flips per instance (from heartbeats),
live instances per role and the flips the scheduler ordered.
"""

from __future__ import annotations

import time
from operator import attrgetter

from services.gateway.prometheus import Registry
from services.gateway.streaming import Generation
from xllm.config import SloConfig
from xllm.protocol import ClusterState

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)

# Per-instance gauges: (metric name, path of the Heartbeat field, help).
INSTANCE_GAUGES = (
    (
        "xllm_instance_requests_running",
        "load.num_running",
        "Sequences in the instance's running batch.",
    ),
    ("xllm_instance_requests_waiting", "load.num_waiting", "Sequences queued at the instance."),
    ("xllm_instance_kv_blocks_used", "kv.blocks_used", "KV blocks held by sequences."),
    (
        "xllm_instance_kv_blocks_free",
        "kv.blocks_free",
        "KV blocks free (cached prefixes included).",
    ),
    (
        "xllm_instance_prefix_queried_tokens",
        "kv.prefix_queried_tokens",
        "Prompt tokens looked up in the instance's prefix cache since it started.",
    ),
    (
        "xllm_instance_prefix_hit_tokens",
        "kv.prefix_hit_tokens",
        "Prompt tokens found in the instance's prefix cache since it started.",
    ),
    (
        "xllm_instance_role_flips",
        "role_flips",
        "Role flips the instance carried out since it started.",
    ),
    (
        "xllm_instance_preemptions",
        "preemption.num_preemptions",
        "Sequences preempted (swapped out or dropped for recompute) since the instance started.",
    ),
    (
        "xllm_instance_swapped_requests",
        "preemption.num_swapped",
        "Offline sequences preempted with their KV in host memory, waiting for room.",
    ),
    (
        "xllm_instance_swap_out_blocks",
        "preemption.swap_out_blocks",
        "KV blocks swapped out to host memory since the instance started.",
    ),
    (
        "xllm_instance_swap_in_blocks",
        "preemption.swap_in_blocks",
        "KV blocks swapped back in since the instance started.",
    ),
    (
        "xllm_instance_swap_seconds",
        "preemption.swap_seconds",
        "Seconds spent copying swapped KV blocks since the instance started.",
    ),
    (
        "xllm_instance_recent_tpot_seconds",
        "steps.recent_tpot",
        "Recent time per decode step (each running request gets one token per step).",
    ),
    (
        "xllm_instance_spec_draft_tokens",
        "speculation.num_draft_tokens",
        "Speculative draft tokens verified since the instance started.",
    ),
    (
        "xllm_instance_spec_accepted_tokens",
        "speculation.num_accepted_draft_tokens",
        "Speculative draft tokens the target model kept since the instance started.",
    ),
    (
        "xllm_instance_spec_acceptance_rate",
        "speculation.recent_acceptance_rate",
        "Kept / verified draft tokens over the instance's recent speculative steps.",
    ),
    (
        "xllm_instance_speculating",
        "speculation.speculating",
        "1 while the instance's adaptive switch has speculation on, else 0.",
    ),
    (
        "xllm_instance_expert_tokens_routed",
        "experts.tokens_routed",
        "MoE: (token, expert) pairs computed since the instance started, over all MoE layers.",
    ),
    (
        "xllm_instance_expert_imbalance",
        "experts.imbalance",
        "MoE: max / mean tokens per expert copy since the current placement (1 = even).",
    ),
    (
        "xllm_instance_expert_recent_imbalance",
        "experts.recent_imbalance",
        "MoE: max / mean tokens per expert copy over the last balancing window.",
    ),
    (
        "xllm_instance_expert_rebalances",
        "experts.num_rebalances",
        "MoE: expert re-placements (EPLB) switched in since the instance started.",
    ),
)


INSTANCE_GAUGES += tuple(
    (f"xllm_instance_kv_{tier}_{name}", f"tiers.{tier}.{field}", f"{help} ({tier} KV tier).")
    for tier in ("host", "disk", "store")
    for name, field, help in (
        ("hits", "hits", "KV blocks loaded back instead of recomputed, since the instance started"),
        ("bytes_loaded", "bytes_loaded", "Bytes of those blocks"),
        ("loads", "num_loads", "Loads (one per request that waited for its prefix)"),
        ("load_seconds", "load_seconds", "Wall time of those loads (mean = this / loads)"),
        ("failed_loads", "failed_loads", "Loads that failed and were recomputed"),
    )
)

INSTANCE_GAUGES += tuple(
    (f"xllm_encoder_{name}", f"encoder.{name}", help)
    for name, help in (
        ("batches", "Vision-tower calls since it started (an encoder's, or an engine's own)."),
        ("images_encoded", "Images the tower ran on (an encoder's: its cache misses)."),
        ("encode_seconds", "Tower time of those batches (latency = this / batches)."),
        ("cache_queries", "Images asked of the encoder instance's embedding cache."),
        ("cache_hits", "Of those, found cached (hit rate = this / cache_queries)."),
        ("cache_bytes", "Bytes of embeddings the encoder instance's cache holds now."),
        ("bytes_published", "Bytes of embeddings the encoder handed out for Mooncake reads."),
        ("bytes_fetched", "Bytes of embeddings the instance read from encoders (Mooncake)."),
    )
)


class GatewayMetrics:
    def __init__(self, slo: SloConfig | None = None) -> None:
        self.slo = slo or SloConfig()
        self.registry = r = Registry()
        self.requests = r.counter(
            "xllm_gateway_requests_total", "HTTP requests answered.", ("endpoint", "status")
        )
        self.running = r.gauge("xllm_gateway_requests_running", "Generation requests in flight.")
        self.ttft = r.histogram(
            "xllm_gateway_time_to_first_token_seconds",
            "From arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
        )
        self.tpot = r.histogram(
            "xllm_gateway_time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            buckets=TPOT_BUCKETS,
        )
        self.e2e = r.histogram(
            "xllm_gateway_e2e_request_latency_seconds",
            "From arrival to the end of a request whose completions all finished.",
            buckets=E2E_BUCKETS,
        )
        self.online_finished = r.counter(
            "xllm_gateway_online_requests_finished_total",
            "Online (HTTP) generation requests that finished (every completion to its end).",
        )
        self.online_slo_met = r.counter(
            "xllm_gateway_online_requests_slo_met_total",
            "Of those, the ones within both SLO targets (--slo-ttft, --slo-tpot; a target of "
            "0 is always met). Attainment = this / xllm_gateway_online_requests_finished_total.",
        )
        self.online_slo_attainment = r.gauge(
            "xllm_gateway_online_slo_attainment",
            "Share of finished online requests within both SLO targets since the gateway "
            "started (1 before the first).",
        )
        self.online_slo_attainment.set(1.0)
        self.num_online_finished = self.num_online_slo_met = 0
        self.prompt_tokens = r.counter("xllm_gateway_prompt_tokens_total", "Prompt tokens.")
        self.generation_tokens = r.counter(
            "xllm_gateway_generation_tokens_total", "Generated tokens received."
        )
        # One gauge per heartbeat field, labelled by instance and role.
        self.instance_gauges = [
            (r.gauge(name, help, ("instance", "role")), attrgetter(path))
            for name, path, help in INSTANCE_GAUGES
        ]
        self.cluster_instances = r.gauge(
            "xllm_cluster_instances", "Live instances per role, as the scheduler places.", ("role",)
        )
        self.cluster_role_flips = r.gauge(
            "xllm_cluster_role_flips", "Role flips the scheduler ordered since it started."
        )
        self.offline_running = r.gauge(
            "xllm_offline_jobs_running", "Offline jobs this gateway is running."
        )
        self.offline_jobs = r.counter(
            "xllm_offline_jobs_total",
            "Offline jobs this gateway finished, by outcome (ok, error, dead_letter).",
            ("outcome",),
        )
        self.offline_queued = r.gauge(
            "xllm_offline_jobs_queued", "Offline jobs waiting in the queue (all workers)."
        )
        self.process_restarts = r.gauge(
            "xllm_process_restarts", "Times the supervisor restarted the process.", ("process",)
        )
        self.process_up = r.gauge(
            "xllm_process_up", "1 while the supervised process runs, else 0.", ("process",)
        )
        self.cluster_shed = r.gauge(
            "xllm_cluster_requests_shed",
            "Online requests the scheduler refused (429) because their TTFT target was out "
            "of reach, since it started.",
        )
        self.cluster_prefix_hit_rate = r.gauge(
            "xllm_cluster_prefix_cache_hit_rate",
            "Prefix-cache hit tokens / looked-up tokens over every live instance.",
        )

    def observe_generation(self, gen: Generation) -> None:
        """Record a generation that has ended (finished, failed or abandoned)."""
        self.prompt_tokens.inc(gen.usage.prompt_tokens)
        self.generation_tokens.inc(gen.usage.completion_tokens)
        if gen.finished:
            self.e2e.observe(time.monotonic() - gen.started_at)
        first, last = gen.first_token_at, gen.last_token_at
        if first is None or last is None:
            return
        ttft, tpot = first - gen.started_at, None
        self.ttft.observe(ttft)
        if gen.usage.completion_tokens > 1:
            per_completion = gen.usage.completion_tokens / len(gen.completions)
            if per_completion > 1:
                tpot = (last - first) / (per_completion - 1)
                self.tpot.observe(tpot)
        if gen.finished and gen.req.priority == 0:
            self._observe_online(ttft, tpot)

    def _observe_online(self, ttft: float, tpot: float | None) -> None:
        """Count a finished online request against the SLO targets (as `xllm bench` does:
        TTFT within its target, and TPOT within its own when there was a second token)."""
        slo = self.slo
        met = (not slo.slo_ttft or ttft <= slo.slo_ttft) and (
            not slo.slo_tpot or tpot is None or tpot <= slo.slo_tpot
        )
        self.num_online_finished += 1
        self.num_online_slo_met += met
        self.online_finished.inc()
        self.online_slo_met.inc(int(met))
        self.online_slo_attainment.set(self.num_online_slo_met / self.num_online_finished)

    def observe_cluster(self, state: ClusterState | None) -> None:
        """Replace the per-instance gauges with `state` (None: the scheduler did not answer)."""
        for gauge, _ in self.instance_gauges:
            gauge.clear()
        self.cluster_instances.clear()
        for hb in state.instances if state is not None else ():
            for gauge, value_of in self.instance_gauges:
                gauge.labels(instance=hb.instance_id, role=hb.role).set(value_of(hb))
        if state is not None:
            self.cluster_prefix_hit_rate.set(prefix_cache_summary(state)["hit_rate"])
            for role, count in state.role_counts.items():
                self.cluster_instances.labels(role=role).set(count)
            self.cluster_role_flips.set(state.num_role_flips)
            self.cluster_shed.set(state.num_shed)

    def observe_processes(self, processes: list[dict]) -> None:
        """The supervisor's processes (`readiness.supervised_processes`), if it has any."""
        self.process_restarts.clear()
        self.process_up.clear()
        for row in processes:
            self.process_restarts.labels(process=row["name"]).set(row["restarts"])
            self.process_up.labels(process=row["name"]).set(int(row["state"] == "running"))

    def render(self) -> str:
        return self.registry.render()


def prefix_cache_summary(state: ClusterState) -> dict[str, float]:
    """Cluster-wide prefix-cache use over the live instances' lifetimes."""
    queried = sum(hb.kv.prefix_queried_tokens for hb in state.instances)
    hits = sum(hb.kv.prefix_hit_tokens for hb in state.instances)
    return {
        "queried_tokens": queried,
        "hit_tokens": hits,
        "hit_rate": hits / queried if queried else 0.0,
    }
