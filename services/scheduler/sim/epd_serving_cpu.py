"""The serving path's CPU outside the engines' steps, measured on a live cluster.

On a machine with fewer cores than processes, what decides a topology live is not only
the steps: the gateway, the scheduler, nats-server and the client share the cores, and each
instance or encoder spends Python CPU outside its steps (its commands, msgpack, the asyncio
loop, streaming every token over NATS, handoff bookkeeping), more the more processes a
request crosses. This measures it, for `ServingCpu`:

  1. every cluster process's CPU time (/proc/<pid>/stat's utime+stime, every thread's,
     in clock ticks), its main thread's apart (/proc/<pid>/task/<pid>/schedstat, to the
     nanosecond), and the instances' reported step time
     (`StepStats.busy_seconds`) and tower time (`EncoderStats.encode_seconds`), sampled
     around an idle second (the idle rate) and around two bursts of the same number of
     fresh requests, one with few output tokens and one with more;
  2. per process kind, its CPU in each burst less the idle rate's share, and for instances
     and encoders only what is outside the steps: the larger of their main threads' CPU
     (the asyncio loop; the steps and tower calls run on another thread) and all their
     CPU less the step or tower time they report (wall time: on a loaded machine it
     exceeds the steps' CPU, so this bound comes out low there); the line through the two
     bursts gives the CPU per request and per output token.

Both bounds are low rather than high: the Mooncake threads of an instance count only in the
second. The bursts go one request at a time, so the steps wait for the cores the least.
"""

from __future__ import annotations

import base64
import json
import os
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from services.scheduler.sim.epd_profile import HopCost, ServingCpu

CLIENT = "client"
"""The process sending the bursts (this one): on the same cores live, so counted."""


def stat_cpu_seconds(stat: str, ticks: int) -> float:
    """utime + stime, in seconds, of a /proc/<pid>/stat line (`ticks` clock ticks a second)."""
    fields = stat[stat.rindex(")") + 2 :].split()  # the name may hold spaces and parentheses
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5)
    return (utime + stime) / ticks


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds (clock ticks: 10 ms steps)."""
    with open(f"/proc/{pid}/stat") as f:
        return stat_cpu_seconds(f.read(), os.sysconf("SC_CLK_TCK"))


def thread_cpu_seconds(pid: int, tid: int) -> float:
    """Seconds thread `tid` of `pid` has run on a CPU, to the nanosecond (schedstat)."""
    with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
        return int(f.read().split()[0]) / 1e9


def cpu_and_loop_seconds(pid: int) -> tuple[float, float]:
    """(all of `pid`'s threads, exited ones too: /proc/<pid>/stat's ticks; its main thread:
    schedstat's nanoseconds, 0 where the kernel keeps none), seconds on a CPU. An
    instance's or encoder's main thread runs its asyncio loop; its steps and tower calls
    run on another."""
    total = proc_cpu_seconds(pid)
    try:
        return total, thread_cpu_seconds(pid, pid)
    except (OSError, ValueError, IndexError):
        return total, 0.0


def process_kind(name: str) -> str:
    """The `ServingCpu` group of a supervised process (`Cluster.process_states` names)."""
    if name.startswith(("prefill-", "decode-", "inst-")):
        return "instance"
    if name.startswith("encode-"):
        return "encoder"
    if name.startswith("nats"):
        return "nats"
    return "front"  # gateway, scheduler, the client, redis, kvstore, mooncake master


@dataclass(frozen=True, slots=True)
class Sample:
    """One moment's counters: CPU seconds by process kind, and the instances' step and
    tower seconds (to subtract from the instance and encoder kinds)."""

    at: float
    cpu: dict[str, float]
    """By kind; "instance" and "encoder" also as "instance loop", "encoder loop": their
    main threads'."""
    steps: float
    tower: float

    def minus(self, before: Sample) -> dict[str, float]:
        """CPU seconds by kind between `before` and this outside the steps: for instances
        and encoders, the larger of two lower bounds, their main threads' (the asyncio loop)
        and all their threads' less the step or tower time they report (wall time, which
        exceeds the CPU on a loaded machine)."""
        out = {k: v - before.cpu.get(k, 0.0) for k, v in self.cpu.items()}
        for kind, inside in (("instance", self.steps - before.steps),
                             ("encoder", self.tower - before.tower)):  # fmt: skip
            if kind in out:
                out[kind] = max(out[kind] - inside, out.pop(f"{kind} loop", 0.0))
        return out


def sample(processes: list[dict], cluster_url: str) -> Sample:
    """`processes` as `Cluster.process_states()` gives them; `cluster_url` the gateway's
    /cluster (step and tower counters)."""
    cpu: dict[str, float] = {CLIENT: cpu_and_loop_seconds(os.getpid())[0]}
    for row in processes:
        try:
            seconds, loop = cpu_and_loop_seconds(row["pid"])
        except (FileNotFoundError, ProcessLookupError):
            continue
        kind = process_kind(row["name"])
        cpu[kind] = cpu.get(kind, 0.0) + seconds
        if kind in ("instance", "encoder"):
            cpu[f"{kind} loop"] = cpu.get(f"{kind} loop", 0.0) + loop
    instances = json.load(urllib.request.urlopen(cluster_url, timeout=10))["instances"]
    steps = sum(i["steps"]["busy_seconds"] for i in instances if i["role"] != "encode")
    tower = sum(i["encoder"]["encode_seconds"] for i in instances if i["role"] == "encode")
    return Sample(time.perf_counter(), cpu, steps, tower)


def fit_serving_cpu(
    idle: tuple[Sample, Sample],
    short: tuple[Sample, Sample],
    long: tuple[Sample, Sample],
    requests: int,
    tokens: tuple[int, int],
) -> ServingCpu:
    """The line through the two bursts (`requests` each, `tokens` = (short's, long's)
    output tokens a request), per kind, after the idle rate's share of each burst."""
    span = max(1e-9, idle[1].at - idle[0].at)
    rate = {k: max(0.0, v) / span for k, v in idle[1].minus(idle[0]).items()}

    def busy(burst: tuple[Sample, Sample]) -> dict[str, float]:
        length = burst[1].at - burst[0].at
        return {k: v - rate.get(k, 0.0) * length for k, v in burst[1].minus(burst[0]).items()}

    a, b = busy(short), busy(long)
    extra = requests * max(1, tokens[1] - tokens[0])

    def per(kind: str) -> tuple[float, float]:
        """(per request, per token) of `kind`, clamped at 0 (noise)."""
        per_token = max(0.0, (b.get(kind, 0.0) - a.get(kind, 0.0)) / extra)
        per_request = max(0.0, a.get(kind, 0.0) / requests - tokens[0] * per_token)
        return per_request, per_token

    front = [per(k) for k in ("front", CLIENT)]
    nats_request, nats_token = per("nats")
    instance = per("instance")
    encoder = per("encoder")[0] if "encoder" in a else instance[0]
    return ServingCpu(
        front_request=sum(r for r, _ in front), front_token=sum(t for _, t in front),
        nats_message=nats_request / HopCost().dispatch_messages(False, False),
        nats_token=nats_token, instance_request=instance[0], instance_token=instance[1],
        encoder_request=encoder, idle=sum(rate.values()),
    )  # fmt: skip


def calibrate(
    processes: Callable[[], list[dict]],
    cluster_url: str,
    burst: Callable[[int, int, int], None],
    requests: int = 8,
    tokens: tuple[int, int] = (2, 16),
    log: Callable[[str], None] = lambda _: None,
) -> ServingCpu:
    """Measure a live, warmed-up cluster: `processes()` its process rows, `burst(n, tokens,
    seed)` sends n fresh image chats (no cache hits: new images each `seed`) of `tokens`
    output tokens and returns when all are done."""

    def around(work: Callable[[], None]) -> tuple[Sample, Sample]:
        before = sample(processes(), cluster_url)
        work()
        time.sleep(1.0)  # a heartbeat or two: the step counters of the last requests
        return before, sample(processes(), cluster_url)

    idle = around(lambda: time.sleep(1.0))
    short = around(lambda: burst(requests, tokens[0], 1))
    long = around(lambda: burst(requests, tokens[1], 2))
    cpu = fit_serving_cpu(idle, short, long, requests, tokens)
    for name, (t0, t1) in (("idle", idle), ("short burst", short), ("long burst", long)):
        raw = {k: round(v, 3) for k, v in t1.minus(t0).items()}
        log(f"{name}: {t1.at - t0.at:.2f} s; CPU s by kind less steps {raw}; steps "
            f"{t1.steps - t0.steps:.3f} s, tower {t1.tower - t0.tower:.3f} s")  # fmt: skip
    log(f"serving CPU outside steps (ms): front {cpu.front_request * 1e3:.2f}/request + "
        f"{cpu.front_token * 1e3:.3f}/token; nats {cpu.nats_message * 1e3:.3f}/message + "
        f"{cpu.nats_token * 1e3:.3f}/token; instance loop {cpu.instance_request * 1e3:.2f}/"
        f"request + {cpu.instance_token * 1e3:.3f}/token; encoder loop "
        f"{cpu.encoder_request * 1e3:.2f}/image; idle {cpu.idle:.3f} cores")  # fmt: skip
    return cpu


def image_chat(base_url: str, model: str, png: bytes, max_tokens: int) -> None:
    """One streamed image chat through the gateway at `base_url` (.../v1), read to its end
    (as a client does: every token's chunk goes through the gateway)."""
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    body = {
        "model": model, "max_tokens": max_tokens, "temperature": 0, "stream": True,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": "Describe the image."}]}],
    }  # fmt: skip
    request = urllib.request.Request(
        f"{base_url}/chat/completions", json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )  # fmt: skip
    with urllib.request.urlopen(request, timeout=600) as response:
        for _ in response:
            pass


def calibrate_gateway(
    base_url: str, height: int, width: int, requests: int = 8,
    log: Callable[[str], None] = lambda _: None,
) -> ServingCpu:  # fmt: skip
    """`calibrate` a running `xllm up` cluster on this machine through its gateway (.../v1):
    its processes from /cluster (the supervisor's rows), image chats of `height` x `width`."""
    from xllm.engine.multimodal import random_image_bytes

    root = base_url.removesuffix("/v1")
    models = json.load(urllib.request.urlopen(f"{base_url}/models", timeout=10))
    model = models["data"][0]["id"]

    def processes() -> list[dict]:
        rows = json.load(urllib.request.urlopen(f"{root}/cluster", timeout=10))["processes"]
        if not rows:
            raise RuntimeError(f"{root}/cluster lists no processes: not started by `xllm up`?")
        return rows

    def burst(n: int, tokens: int, seed: int) -> None:
        for i in range(n):
            png = random_image_bytes(height, width, seed=2**30 + 1000 * seed + i)
            image_chat(base_url, model, png, tokens)

    burst(1, 2, 0)  # warm
    return calibrate(processes, f"{root}/cluster", burst, requests, log=log)
