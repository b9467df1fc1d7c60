"""What a simulation run says: SLO attainment, goodput, latency percentiles, utilisation.

Definitions (stated once, used by the table and the JSON line):
  * TTFT = first token time - arrival; TPOT = (finish - first token) / (output tokens - 1),
    undefined for one-token outputs (they meet any TPOT target);
  * a request meets the SLO when TTFT <= slo_ttft and TPOT <= slo_tpot; rejected requests
    (no instance, prompt too long) count as missing it;
  * `wall` runs from the first arrival to the last finish (or arrival);
  * goodput = requests meeting the SLO per second of wall time;
  * utilisation of an instance = time spent in steps / wall time (or until the last
    offline request finished, if later).

Offline requests (priority > 0) have no SLO: every figure above is over the online
requests alone, and the offline ones add their count and their output tokens per second
of that wall time (of the requests finished within it; with no online requests, the wall
runs from 0 to the last offline finish).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from services.scheduler.sim.instance import SimInstance, SimRequest


@dataclass(frozen=True, slots=True)
class Slo:
    ttft: float
    tpot: float


@dataclass(frozen=True, slots=True)
class SimReport:
    policy: str
    num_instances: int
    num_requests: int
    num_rejected: int
    slo_attainment: float
    goodput_rps: float
    throughput_rps: float
    wall_s: float
    ttft_p50: float
    ttft_p90: float
    ttft_p99: float
    tpot_p50: float
    tpot_p90: float
    tpot_p99: float
    util_mean: float
    util_min: float
    util_max: float
    prefix_hit_rate: float
    role_flips: int
    final_roles: str
    """Instances per role at the end, e.g. "8P:8D" or "16 both"."""
    utilisation: dict[str, float]
    num_offline: int = 0
    """Offline requests submitted (the backlog's, as far as the run took it)."""
    offline_done: int = 0
    """Of those, finished within the wall time."""
    offline_tok_s: float = 0.0
    """Their output tokens per second of wall time."""

    def as_dict(self) -> dict:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between ranks (numpy's default); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def ttft(req: SimRequest) -> float | None:
    return None if req.first_token_at is None else req.first_token_at - req.arrival


def tpot(req: SimRequest) -> float | None:
    if req.finished_at is None or req.first_token_at is None or req.output_len <= 1:
        return None
    return (req.finished_at - req.first_token_at) / (req.output_len - 1)


def meets(req: SimRequest, slo: Slo) -> bool:
    if req.rejected or req.finished_at is None:
        return False
    t, p = ttft(req), tpot(req)
    return t is not None and t <= slo.ttft and (p is None or p <= slo.tpot)


def summarize(
    policy: str, requests: Sequence[SimRequest], instances: Sequence[SimInstance], slo: Slo
) -> SimReport:
    offline = [r for r in requests if r.priority > 0]
    requests = [r for r in requests if r.priority == 0]
    timed = requests or [replace(r, arrival=0.0) for r in offline]
    start = min((r.arrival for r in timed), default=0.0)
    end = max([r.arrival for r in timed] + [r.finished_at or 0.0 for r in timed])
    wall = max(end - start, 1e-9)
    offline_done = [r for r in offline if r.finished_at is not None and r.finished_at <= end]
    ttfts = [t for r in requests if (t := ttft(r)) is not None]
    tpots = [t for r in requests if (t := tpot(r)) is not None]
    # Offline work in flight when the online trace ends finishes after it: steps to then.
    busy_span = max([wall] + [(r.finished_at or 0.0) - start for r in offline])
    util = {i.instance_id: i.busy_time / busy_span for i in instances}
    queried = sum(i.prefix_queried_tokens for i in instances)
    hit = sum(i.prefix_hit_tokens for i in instances)
    good = sum(meets(r, slo) for r in requests)
    done = sum(r.finished_at is not None and not r.rejected for r in requests)
    return SimReport(
        policy=policy,
        num_instances=len(instances),
        num_requests=len(requests),
        num_rejected=sum(r.rejected for r in requests),
        slo_attainment=good / len(requests) if requests else math.nan,
        goodput_rps=good / wall,
        throughput_rps=done / wall,
        wall_s=wall,
        ttft_p50=percentile(ttfts, 50),
        ttft_p90=percentile(ttfts, 90),
        ttft_p99=percentile(ttfts, 99),
        tpot_p50=percentile(tpots, 50),
        tpot_p90=percentile(tpots, 90),
        tpot_p99=percentile(tpots, 99),
        util_mean=sum(util.values()) / len(util) if util else math.nan,
        util_min=min(util.values(), default=math.nan),
        util_max=max(util.values(), default=math.nan),
        prefix_hit_rate=hit / queried if queried else 0.0,
        role_flips=sum(i.role_flips for i in instances),
        final_roles=roles_label([i.role for i in instances]),
        utilisation=util,
        num_offline=len(offline),
        offline_done=len(offline_done),
        offline_tok_s=sum(r.output_len for r in offline_done) / wall,
    )


def roles_label(roles: Sequence[str]) -> str:
    num_prefill, num_decode = roles.count("prefill"), roles.count("decode")
    if num_prefill + num_decode == 0:
        return f"{len(roles)} both"
    label = f"{num_prefill}P:{num_decode}D"
    num_both = len(roles) - num_prefill - num_decode
    return f"{label}+{num_both} both" if num_both else label


COLUMNS = (
    ("instances", "num_instances", "{}"),
    ("policy", "policy", "{}"),
    ("SLO attain.", "slo_attainment", "{:.1%}"),
    ("goodput req/s", "goodput_rps", "{:.3f}"),
    ("TTFT p50 s", "ttft_p50", "{:.3g}"),
    ("TTFT p90 s", "ttft_p90", "{:.3g}"),
    ("TTFT p99 s", "ttft_p99", "{:.3g}"),
    ("TPOT p50 s", "tpot_p50", "{:.3g}"),
    ("TPOT p90 s", "tpot_p90", "{:.3g}"),
    ("TPOT p99 s", "tpot_p99", "{:.3g}"),
    ("util mean/min/max", None, "{:.0%}/{:.0%}/{:.0%}"),
    ("prefix hit", "prefix_hit_rate", "{:.1%}"),
    ("rejected", "num_rejected", "{}"),
    ("role flips", "role_flips", "{}"),
    ("roles at end", "final_roles", "{}"),
    ("offline tok/s", "offline_tok_s", "{:.0f}"),
)


def markdown_table(reports: Sequence[SimReport]) -> str:
    head = "| " + " | ".join(c[0] for c in COLUMNS) + " |"
    rule = "| " + " | ".join("---" if i == 1 else "---:" for i in range(len(COLUMNS))) + " |"
    rows = [head, rule]
    for r in reports:
        cells = []
        for _, attr, fmt in COLUMNS:
            if attr is None:
                cells.append(fmt.format(r.util_mean, r.util_min, r.util_max))
            else:
                cells.append(fmt.format(getattr(r, attr)))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
