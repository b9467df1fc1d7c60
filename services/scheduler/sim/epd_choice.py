"""Choosing the EPD disaggregation strategy: every topology of N instances, simulated on the
workload with the profiled costs, the best by goodput.

Topologies (report §3.3), each with its instance split and the `xllm up` flags that deploy
it (`cluster_options`, `ClusterConfig`'s fields):

  * EPD     N colocated instances, each encoding its own images  (`--instances N`)
  * E+PD    E encoders + N-E colocated                            (`--encode E --instances N-E`)
  * EP+D    P prefill instances encoding their images + N-P decode (`--prefill P --decode N-P`)
  * ED+P    P prefill + N-P decode instances that also encode     (`... --encode-on decode`)
  * E+P+D   E encoders + P prefill + D decode                     (`--encode E --prefill P --decode D`)

`choose` is pure: the best goodput (requests meeting both SLOs per second), ties broken by
SLO attainment, then the lower TTFT p99, then fewer kinds of instance (the simpler
deployment), and it says why in one line per candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from services.scheduler.cost_model import load_model_config
from services.scheduler.policies import POLICIES_USING_PREFIX_HITS, FlipConfig, get_policy
from services.scheduler.sim.epd_profile import EpdProfile
from services.scheduler.sim.epd_sim import ENCODER_MAX_BATCH, EpdSimulator, ImageSimRequest
from services.scheduler.sim.epd_workload import ImageRequest
from services.scheduler.sim.instance import InstanceSpec
from services.scheduler.sim.report import SimReport, Slo, summarize
from services.scheduler.sim.run import kv_tokens
from services.scheduler.sim.simulator import ClusterSpec
from xllm.hardware import HardwareProfile
from xllm.models.config import ModelConfig

KINDS = ("EPD", "E+PD", "EP+D", "ED+P", "E+P+D")
"""Every kind, in the order candidates come (epd_tool.KINDS spells them out too)."""


@dataclass(frozen=True, slots=True)
class Topology:
    kind: str
    encode: int = 0
    prefill: int = 0
    decode: int = 0
    both: int = 0

    @property
    def label(self) -> str:
        parts = [(self.encode, "E"), (self.prefill, "P"), (self.decode, "D"), (self.both, "PD")]
        if self.kind == "ED+P":
            parts = [(self.prefill, "P"), (self.decode, "ED")]
        return f"{self.kind} " + ":".join(f"{n}{r}" for n, r in parts if n)

    @property
    def roles(self) -> tuple[str, ...]:
        return ("prefill",) * self.prefill + ("decode",) * self.decode + ("both",) * self.both

    @property
    def encode_on(self) -> str:
        return "decode" if self.kind == "ED+P" else ""

    def cluster_options(self) -> dict:
        """`ClusterConfig` fields that deploy it (`xllm up --encode ... --prefill ...`)."""
        out: dict = {"encode": self.encode}
        if self.both:
            out["instances"] = self.both
        else:
            out |= {"prefill": self.prefill, "decode": self.decode}
        if self.encode_on:
            out["encode_on"] = self.encode_on
        return out


def candidates(n: int, kinds: tuple[str, ...] = KINDS) -> list[Topology]:
    """Every split of `n` instances into each kind (each part at least one instance)."""
    out = []
    if "EPD" in kinds:
        out.append(Topology("EPD", both=n))
    for k in range(1, n):
        if "E+PD" in kinds:
            out.append(Topology("E+PD", encode=k, both=n - k))
        if "EP+D" in kinds:
            out.append(Topology("EP+D", prefill=k, decode=n - k))
        if "ED+P" in kinds:
            out.append(Topology("ED+P", prefill=k, decode=n - k))
    if "E+P+D" in kinds:
        for e in range(1, n - 1):
            for p in range(1, n - e):
                out.append(Topology("E+P+D", encode=e, prefill=p, decode=n - e - p))
    return out


def instance_spec(model: ModelConfig, hw: HardwareProfile) -> InstanceSpec:
    """An instance as `xllm up` starts one: `EngineConfig`'s defaults (its KV pool too)."""
    from xllm.config import EngineConfig

    engine = EngineConfig()
    tokens = kv_tokens(model, hw, engine.kv_cache_gb)
    return InstanceSpec(
        num_kv_blocks=tokens // engine.block_size, block_size=engine.block_size,
        max_num_seqs=engine.max_num_seqs, max_num_batched_tokens=engine.max_num_batched_tokens,
        max_model_len=tokens // engine.block_size * engine.block_size,
        enable_prefix_caching=engine.enable_prefix_caching,
    )  # fmt: skip


def sim_requests(workload: list[ImageRequest]) -> list[ImageSimRequest]:
    return [
        ImageSimRequest(
            f"r{i}",
            r.arrival,
            r.num_prompt_tokens,
            r.output_len,
            image_tokens=r.image_tokens,
            image_id=r.image_id,
        )
        for i, r in enumerate(workload)
    ]


def simulate(
    topology: Topology,
    workload: list[ImageRequest],
    model_config: str,
    hw: HardwareProfile,
    profile: EpdProfile,
    slo: Slo,
    instance: InstanceSpec,
    policy: str = "cache-aware",
    encoder_max_batch: int = ENCODER_MAX_BATCH,
    concurrency: int = 0,
    cores: int | None = None,
) -> tuple[SimReport, dict]:
    """One topology's run: its report (named by its label) and its encoders' counters.
    `concurrency` > 0: closed loop, that many requests in flight (arrival times ignored).
    The processes share `cores` (None: the profile's; 0: a core each), and a request's
    trips between them cost the profile's measured `hops`, its serving path's CPU outside
    the steps the profile's `serving_cpu`."""
    model = load_model_config(model_config)
    sim = EpdSimulator(
        model, hw, ClusterSpec(topology.roles, instance), get_policy(policy),
        uses_prefix_hits=policy in POLICIES_USING_PREFIX_HITS,
        targets=FlipConfig(slo_ttft=slo.ttft, slo_tpot=slo.tpot),
        encode=profile.encode, num_encoders=topology.encode, encode_on=topology.encode_on,
        encoder_max_batch=encoder_max_batch, max_encode_batch=profile.max_encode_batch,
        max_encode_tokens=profile.max_encode_tokens, hops=profile.hops,
        serving_cpu=profile.serving_cpu,
        cores=profile.cores if cores is None else cores,
    )  # fmt: skip
    requests = sim_requests(workload)
    requests = sim.run_closed(requests, concurrency) if concurrency else sim.run(requests)
    report = summarize(topology.label, requests, sim.instances, slo)
    return replace(report, num_instances=len(topology.roles) + topology.encode), sim.encoder_stats()


def choose(reports: list[SimReport], kinds: list[str]) -> tuple[int, list[str]]:
    """The index of the best report and one line of reasons per candidate."""

    def key(i: int) -> tuple:
        r = reports[i]
        p99 = r.ttft_p99 if not math.isnan(r.ttft_p99) else math.inf
        return (-r.goodput_rps, -r.slo_attainment, p99, kinds[i] != "EPD")

    best = min(range(len(reports)), key=key)
    b = reports[best]
    lines = []
    for i, r in enumerate(reports):
        what = (
            f"{r.policy}: goodput {r.goodput_rps:.3f} req/s, SLO {r.slo_attainment:.0%}, "
            f"TTFT p50/p99 {r.ttft_p50 * 1e3:.0f}/{r.ttft_p99 * 1e3:.0f} ms, "
            f"TPOT p50/p99 {r.tpot_p50 * 1e3:.1f}/{r.tpot_p99 * 1e3:.1f} ms"
        )
        if i == best:
            lines.append(what + " <- chosen: the highest goodput")
        elif r.goodput_rps < b.goodput_rps:
            lines.append(what + f" ({b.goodput_rps - r.goodput_rps:.3f} req/s less goodput)")
        else:
            lines.append(what + " (as much goodput; lost on SLO attainment or TTFT p99)")
    return best, lines
