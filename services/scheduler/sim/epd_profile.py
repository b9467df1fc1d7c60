"""What the EPD profiler learns about one model on one machine, and the searches that learn it.

Report §3.3: an instance that encodes, prefills and decodes in one step must keep that step
under the TPOT SLO, so the profiler binary-searches, over a measure callback (the real
engine in `epd_measure.py`, a synthetic cost function in the tests),

  * the largest encode batch (images per step, beside a running decode batch), and
  * the largest prefill token budget (beside the same decode batch),

whose step stays within the SLO, and records the vision tower's cost per image size, the
bytes of an image's embeddings, what a request's trips between processes cost (`HopCost`:
a NATS message, a Mooncake read), the cores the processes share and the serving path's
CPU outside the steps (`ServingCpu`). Everything here is
pure: the searches take the measuring as a function, `EncodeCost` and `HopCost` are
arithmetic on measured points, `EpdProfile` is plain data (JSON).
"""

from __future__ import annotations

import json
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path


def max_under(measure: Callable[[int], float], lo: int, hi: int, limit: float) -> int:
    """The largest x in [lo, hi] with measure(x) <= limit, for a measure that grows with x;
    lo - 1 when even measure(lo) is over. Doubles from lo, then bisects: about 2·log2(hi/lo)
    measurements, each of them a real step on the engine, so none is wasted on a bound
    already known."""
    if measure(lo) > limit:
        return lo - 1
    good, bad = lo, None  # measure(good) <= limit < measure(bad)
    step = max(1, lo)
    while bad is None:
        probe = min(good + step, hi)
        if probe == good:
            return good  # hi itself fits
        if measure(probe) <= limit:
            good, step = probe, 2 * step
        else:
            bad = probe
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if measure(mid) <= limit else (good, mid)
    return good


@dataclass(frozen=True, slots=True)
class EncodeCost:
    """The seconds of encoding an image, by the language-model tokens it becomes, linear
    between measured sizes (and beyond the largest, on the last two's slope): the vision
    tower's, plus a fixed cost per tower call (one call encodes a whole batch), plus
    decoding the image's file on the process that encodes it."""

    points: tuple[tuple[int, float], ...]
    """(image tokens, tower seconds of that image alone, without `call_overhead`), by tokens."""
    call_overhead: float = 0.0
    bytes_per_token: int = 0
    """Embedding bytes per image token (hidden size x dtype bytes): what an encoder hands
    the instance that runs the prompt."""
    decode_points: tuple[tuple[int, float], ...] = ()
    """(image tokens, seconds to decode and preprocess such an image's file: PNG, resize,
    patches; `ImageInput.from_bytes`), by tokens; () = not measured."""

    def image_seconds(self, tokens: int) -> float:
        return _linear(self.points, tokens) + _linear(self.decode_points, tokens)

    def batch_seconds(self, tokens: Sequence[int]) -> float:
        """One tower call on images of these token counts (0 for none)."""
        if not tokens:
            return 0.0
        return self.call_overhead + sum(self.image_seconds(t) for t in tokens)

    def embedding_bytes(self, tokens: int) -> int:
        return tokens * self.bytes_per_token


def _linear(pts: tuple[tuple[int, float], ...], tokens: int) -> float:
    """Seconds at `tokens` on the line through the measured (tokens, seconds) `pts`."""
    if not pts:
        return 0.0
    if len(pts) == 1:
        return pts[0][1] * tokens / max(1, pts[0][0])
    i = min(max(bisect_left([t for t, _ in pts], tokens), 1), len(pts) - 1)
    (t0, s0), (t1, s1) = pts[i - 1], pts[i]
    return max(0.0, s0 + (s1 - s0) * (tokens - t0) / max(1, t1 - t0))


def fit_encode_cost(samples: Sequence[tuple[int, int, float]], bytes_per_token: int) -> EncodeCost:
    """From (images, tokens per image, seconds of the call) measurements: the call overhead
    is where the line through batch sizes of one image size meets zero images, the points
    are the per-image rest for each size."""
    by_tokens: dict[int, list[tuple[int, float]]] = {}
    for num_images, tokens, seconds in samples:
        by_tokens.setdefault(tokens, []).append((num_images, seconds))
    overheads, per_image = [], {}
    for tokens, runs in sorted(by_tokens.items()):
        runs.sort()
        (n0, s0), (n1, s1) = runs[0], runs[-1]
        slope = (s1 - s0) / (n1 - n0) if n1 > n0 else s0 / max(1, n0)
        per_image[tokens] = max(slope, 0.0)
        if n1 > n0:
            overheads.append(max(0.0, s0 - slope * n0))
    overhead = sorted(overheads)[len(overheads) // 2] if overheads else 0.0
    points = tuple((t, s) for t, s in sorted(per_image.items()))
    return EncodeCost(points, overhead, bytes_per_token)


@dataclass(frozen=True, slots=True)
class HopCost:
    """The fixed costs of a request's trips between processes, measured (`epd_hops.py`);
    all 0 = not measured (free messages, transfers priced by the hardware profile)."""

    nats_rtt: float = 0.0
    """Seconds of a small NATS request/reply through the server (two messages)."""
    transfer_latency: float = 0.0
    """Seconds of a Mooncake read apart from its bytes (registering the buffer, the call)."""
    transfer_bw: float = 0.0
    """Bytes per second of a Mooncake read between two local transfer engines."""

    @property
    def message(self) -> float:
        """One message's seconds, sender to receiver (half a round trip)."""
        return self.nats_rtt / 2

    def dispatch_messages(self, encoder: bool, disaggregated: bool) -> int:
        """Messages on a request's path to its first token, apart from the transfers: the
        gateway's submit to the scheduler, the scheduler's command to the instance and the
        first token's way back to the gateway; plus the encoder's request and reply
        (`services/scheduler/encode.py`) and the decode instance asking the prefill one."""
        return 3 + 2 * encoder + disaggregated

    def transfer_seconds(self, nbytes: int) -> float:
        return self.transfer_latency + nbytes / self.transfer_bw if self.transfer_bw else 0.0


def fit_transfer(samples: Sequence[tuple[int, float]]) -> tuple[float, float]:
    """(latency seconds, bytes per second) of the line through (bytes, seconds) of the
    smallest and the largest transfer measured; when noise makes the larger no slower (a
    loaded machine), the smallest's time as the latency and the largest's average rate."""
    (b0, s0), (b1, s1) = min(samples), max(samples)
    if b1 <= b0 or s1 <= s0:
        return s0 if b1 > b0 else 0.0, b1 / max(s1, 1e-12)
    slope = (s1 - s0) / (b1 - b0)
    return max(0.0, s0 - slope * b0), 1.0 / slope


@dataclass(frozen=True, slots=True)
class ServingCpu:
    """CPU seconds the serving path spends outside the engines' steps, per process kind,
    measured on a live colocated cluster (`epd_serving_cpu.py`: /proc utime+stime of every
    process around short bursts, minus the step and tower time the instances report); all
    0 = not measured (the simulator then charges nothing). What a request costs where it
    goes: the front (gateway, scheduler, the benchmark's client, the other servers) per
    request and per streamed token, nats-server per message, each process it crosses
    (instance or encoder loop: its command, msgpack, handoff bookkeeping) per request, and
    the instance that decodes it per token (sampling out, streaming over NATS)."""

    front_request: float = 0.0
    """Gateway + scheduler + client + other servers, per request."""
    front_token: float = 0.0
    """The same, per output token (the gateway streams each one)."""
    nats_message: float = 0.0
    """nats-server per message on a request's way to its first token (a colocated request
    sends `HopCost.dispatch_messages(False, False)` of them)."""
    nats_token: float = 0.0
    """nats-server per output token (one streamed message each)."""
    instance_request: float = 0.0
    """An instance's loop outside its steps, per request it takes (placed or handed over)."""
    instance_token: float = 0.0
    """An instance's loop outside its steps, per token it produces."""
    encoder_request: float = 0.0
    """An encoder's loop outside the tower, per image asked for (measured only on a
    cluster with encoders; else `instance_request`)."""
    idle: float = 0.0
    """CPU seconds per second the whole idle cluster burns (heartbeats, polling): measured
    and subtracted from the bursts, not charged."""

    @property
    def measured(self) -> bool:
        return any((self.front_request, self.front_token, self.instance_request,
                    self.instance_token, self.nats_message, self.nats_token))  # fmt: skip


@dataclass(frozen=True, slots=True)
class EpdProfile:
    """The profiler's findings for one model on one machine, at one TPOT SLO."""

    model: str
    tpot_slo: float
    """Seconds a step may take (the TPOT target)."""
    decode_batch: int
    """Decoding sequences in the steps searched (the batch an instance keeps running)."""
    decode_ctx: int
    decode_step: float
    """Seconds of that decode batch's step alone."""
    image_tokens: int
    """Tokens of the image used for the encode-batch search (the workload's median)."""
    max_encode_batch: int
    """Images of `image_tokens` that one step can encode beside the decode batch within
    the SLO (the engine's `--max-encode-batch`; 0: not even one)."""
    max_encode_tokens: int
    """`max_encode_batch` in vision tokens (the engine's `--max-encode-tokens`)."""
    max_prefill_tokens: int
    """Prompt tokens one step can prefill beside the decode batch within the SLO (a chunked
    prefill budget: `--max-num-batched-tokens` minus the decodes)."""
    encode: EncodeCost
    step_points: list[dict] = field(default_factory=list)
    """Every step measured in the searches: {decodes, images, prefill_tokens, seconds}."""
    hardware_profile: str = ""
    """The fitted language-model cost profile (JSON) saved beside this one, if any."""
    hops: HopCost = HopCost()
    """What a request's trips between processes cost here (NATS messages, Mooncake reads)."""
    cores: int = 0
    """CPU cores the deployment's processes share (the profiler's machine; 0 = a core for
    every process, no sharing)."""
    serving_cpu: ServingCpu = ServingCpu()
    """The serving path's CPU outside the steps (measured on a live cluster; profiles saved
    before it was measured load with none)."""

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> EpdProfile:
        enc = d["encode"]
        encode = EncodeCost(
            tuple((int(t), float(s)) for t, s in enc["points"]),
            enc["call_overhead"],
            enc["bytes_per_token"],
            tuple((int(t), float(s)) for t, s in enc.get("decode_points", ())),
        )
        hops = HopCost(**d.get("hops", {}))  # profiles saved before hops were measured: none
        cpu = ServingCpu(**d.get("serving_cpu", {}))
        return cls(**{**d, "encode": encode, "hops": hops, "serving_cpu": cpu})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.as_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EpdProfile:
        return cls.from_dict(json.loads(Path(path).read_text()))


def search_budgets(
    step_seconds: Callable[[int, int], float], tpot_slo: float, max_images: int, max_tokens: int
) -> tuple[int, int]:
    """(max encode batch, max prefill tokens) within `tpot_slo`, `step_seconds(images,
    prefill_tokens)` being one step's time beside the decode batch."""
    images = max_under(lambda b: step_seconds(b, 0), 1, max_images, tpot_slo)
    tokens = max_under(lambda t: step_seconds(0, t), 16, max_tokens, tpot_slo)
    return max(images, 0), tokens if tokens >= 16 else 0
