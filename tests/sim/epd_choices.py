"""The EPD profiler's choice on a fixed machine and workload, for tests that vary one input
of the profile (the tower's cost, the trips, the cores, the serving path's CPU) and check
which topology of 3 processes wins."""

from __future__ import annotations

from services.scheduler.sim.epd_choice import candidates, choose, simulate
from services.scheduler.sim.epd_profile import EncodeCost, EpdProfile, HopCost, ServingCpu
from services.scheduler.sim.epd_workload import ImageRequest
from services.scheduler.sim.instance import InstanceSpec
from services.scheduler.sim.report import Slo
from xllm.hardware import SPEC_PROFILES

HW = SPEC_PROFILES["a100"]
SPEC = InstanceSpec(num_kv_blocks=4096, block_size=16, max_num_batched_tokens=2048)
IMAGE = 256
NO_HOPS, NO_SERVING_CPU = HopCost(), ServingCpu()  # the profile's own defaults


def profile_of(
    per_image: float, hops: HopCost = NO_HOPS, cores: int = 0,
    serving_cpu: ServingCpu = NO_SERVING_CPU,
) -> EpdProfile:  # fmt: skip
    """A profile of a 10 ms decode step of 8 under a 50 ms TPOT SLO, with a tower call of
    `per_image` seconds for an image of IMAGE tokens."""
    return EpdProfile(
        model="m", tpot_slo=0.05, decode_batch=8, decode_ctx=128, decode_step=0.01,
        image_tokens=IMAGE, max_encode_batch=2, max_encode_tokens=2 * IMAGE,
        max_prefill_tokens=900, encode=EncodeCost(((IMAGE, per_image),), 0.001, 4096),
        hops=hops, cores=cores, serving_cpu=serving_cpu,
    )  # fmt: skip


def chosen_kind(
    per_image: float, hops: HopCost, cores: int, serving_cpu: ServingCpu = NO_SERVING_CPU
) -> str:
    """The topology of 3 processes chosen for 48 image chats, 8 at a time."""
    profile = profile_of(per_image, hops, cores, serving_cpu)
    workload = [ImageRequest(0.0, 480, 640, i, IMAGE, 16) for i in range(48)]
    tops = candidates(3)
    reports = [
        simulate(t, workload, "qwen3-0.6b", HW, profile, Slo(0.5, 0.05), SPEC, concurrency=8)[0]
        for t in tops
    ]
    return tops[choose(reports, [t.kind for t in tops])[0]].kind
