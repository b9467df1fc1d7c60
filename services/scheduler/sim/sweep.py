"""`xllm sim sweep`: load (time scale) × instance count × arm → goodput and SLO attainment,
as a markdown table, a JSON file and a PNG plot, so "how many instances for this trace at
this SLO" reads off one picture.

An arm is a policy on a cluster shape, the three the SLO-aware PD policy is held against:

* `colocated`: every instance `both`, `least-load`;
* `disaggregated`: half the instances prefill (the odd one too), half decode, `least-load`
  for each half;
* `slo-pd`: the same split to start from, `slo-pd` with its role flips and SLO admission at
  the target itself (`--slo-admission 1`: refuse what is predicted to miss its TTFT, the
  goodput-maximising choice, since a refused request and a late one count the same);
* `colocated+admission`: `colocated` with the same admission, to show what admission alone
  is worth.

Every run is `run.simulate` on `run.setup_from_args`' setup, as `xllm sim` runs it; only
the time scale, the roles and the scheduler's admission margin change between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from services.scheduler.sim import run as sim_run
from services.scheduler.sim.report import SimReport

ARMS = {
    # name: (policy, disaggregated start, admission margin)
    "colocated": ("least-load", False, 0.0),
    "disaggregated": ("least-load", True, 0.0),
    "slo-pd": ("slo-pd", True, 1.0),
    "colocated+admission": ("least-load", False, 1.0),
}
DEFAULT_ARMS = ("colocated", "disaggregated", "slo-pd")


@dataclass(frozen=True, slots=True)
class SweepRow:
    time_scale: float
    offered_rps: float
    """Requests per second the trace offers at this time scale (count / span)."""
    arm: str
    report: SimReport

    def as_dict(self) -> dict:
        return {
            "time_scale": self.time_scale,
            "offered_rps": self.offered_rps,
            "arm": self.arm,
            **self.report.as_dict(),
        }


def split(num_instances: int) -> str:
    """The disaggregated start: half prefill (rounded up), half decode."""
    num_prefill = (num_instances + 1) // 2
    return f"{num_prefill}:{num_instances - num_prefill}"


def sweep(
    args: argparse.Namespace,
    time_scales: Sequence[float],
    counts: Sequence[int],
    arms: Sequence[str],
    log=print,
) -> list[SweepRow]:
    rows = []
    for scale in time_scales:
        for count in counts:
            for arm in arms:
                policy, disaggregated, margin = ARMS[arm]
                run_args = argparse.Namespace(
                    **{
                        **vars(args),
                        "time_scale": scale,
                        "pd": split(count) if disaggregated else "",
                    }
                )
                setup = sim_run.setup_from_args(run_args, count)
                setup = replace(setup, scheduler=replace(setup.scheduler, slo_admission=margin))
                start = time.perf_counter()
                report = sim_run.simulate(setup, policy)
                log(f"{arm} x{count} @ time scale {scale:g}: {time.perf_counter() - start:.1f} s")
                trace = setup.trace
                span = max(trace[-1].arrival - trace[0].arrival, 1e-9)
                rows.append(SweepRow(scale, len(trace) / span, arm, replace(report, policy=arm)))
    return rows


COLUMNS = (
    ("time scale", lambda r: f"{r.time_scale:g}"),
    ("offered req/s", lambda r: f"{r.offered_rps:.2f}"),
    ("instances", lambda r: str(r.report.num_instances)),
    ("arm", lambda r: r.arm),
    ("SLO attain.", lambda r: f"{r.report.slo_attainment:.1%}"),
    ("goodput req/s", lambda r: f"{r.report.goodput_rps:.3f}"),
    ("TTFT p50 / p99 s", lambda r: f"{r.report.ttft_p50:.3g} / {r.report.ttft_p99:.3g}"),
    ("TPOT p50 / p99 s", lambda r: f"{r.report.tpot_p50:.3g} / {r.report.tpot_p99:.3g}"),
    ("rejected", lambda r: str(r.report.num_rejected)),
    ("flips", lambda r: str(r.report.role_flips)),
    ("roles at end", lambda r: r.report.final_roles),
)


def markdown_table(rows: Sequence[SweepRow]) -> str:
    lines = [
        "| " + " | ".join(name for name, _ in COLUMNS) + " |",
        "| " + " | ".join("---" if name == "arm" else "---:" for name, _ in COLUMNS) + " |",
    ]
    lines += ["| " + " | ".join(cell(r) for _, cell in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def plot(rows: Sequence[SweepRow], title: str, path: Path) -> None:
    """Goodput (top) and SLO attainment (bottom) against offered load, one column per
    instance count, one line per arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = sorted({r.report.num_instances for r in rows})
    arms = list(dict.fromkeys(r.arm for r in rows))
    fig, axes = plt.subplots(2, len(counts), figsize=(4.5 * len(counts), 6.5), squeeze=False)
    for col, count in enumerate(counts):
        for arm in arms:
            mine = sorted(
                (r for r in rows if r.arm == arm and r.report.num_instances == count),
                key=lambda r: r.offered_rps,
            )
            x = [r.offered_rps for r in mine]
            axes[0][col].plot(x, [r.report.goodput_rps for r in mine], "o-", label=arm)
            axes[1][col].plot(x, [100 * r.report.slo_attainment for r in mine], "o-", label=arm)
        axes[0][col].set_title(f"{count} instances")
        axes[0][col].set_ylabel("goodput, req/s")
        axes[1][col].set_ylabel("SLO attainment, %")
        axes[1][col].set_xlabel("offered load, req/s")
        axes[1][col].set_ylim(0, 105)
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.slo_ttft is None or args.slo_tpot is None:
        print("error: give --slo-ttft and --slo-tpot", file=sys.stderr)
        return 2
    try:
        scales = [float(x) for x in args.time_scales.split(",")]
        counts = [int(x) for x in str(args.instances).split(",")]
        arms = args.arms.split(",")
        unknown = [a for a in arms if a not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {unknown}; choose from {', '.join(ARMS)}")
        rows = sweep(args, scales, counts, arms, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    title = (
        f"{args.trace} on {args.profile} ({args.model_config}), "
        f"SLO TTFT <= {args.slo_ttft:g} s, TPOT <= {args.slo_tpot:g} s"
    )
    table = markdown_table(rows)
    print(title)
    print(table)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(f"{title}\n\n{table}\n")
        data = {"title": title, "args": _args_dict(args), "rows": [r.as_dict() for r in rows]}
        out.with_suffix(".json").write_text(json.dumps(data, indent=1) + "\n")
        plot(rows, title, out.with_suffix(".png"))
        print(f"wrote {out.with_suffix('.md')}, .json, .png", file=sys.stderr)
    return 0


def _args_dict(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}
