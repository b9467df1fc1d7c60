"""Hardware profiles: spec numbers of a device plus the factors that make the roofline honest.

A roofline alone is optimistic: real kernels reach a fraction of peak, and every step pays
fixed costs (Python, kernel launches, sampling) the roofline does not see. So a profile
carries correction factors, and `time_of` is

    t = overhead + per_seq · num_seqs + max(C, M) + overlap · min(C, M)
    C = (linear_factor · linear_flops + attn_factor · prefill_attn_flops
         + decode_attn_factor · decode_attn_flops) / peak
    M = weight_factor · weight_bytes / mem_bw + kv_factor · kv_bytes / mem_bw

`overlap` says whether compute and memory traffic overlap (0: a fused GPU kernel hides one
behind the other) or add up (1: eager PyTorch on a CPU runs one op after another, each
bound by one of them). With overlap = 1 the model is linear in its factors, which is what
`calibrate.py` fits by least squares on measurements of our engine. The GPU and NPU
profiles are spec sheets with typical efficiencies; they are not fitted.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

PROFILES_DIR = Path(__file__).parent / "hardware_profiles"
"""The built-in profiles fitted here (`xllm sim calibrate --out`), one JSON file each."""
GB = 1e9
GiB = 2**30


@dataclass(frozen=True, slots=True)
class StepCost:
    """A step's work, split by the kernel that does it (so each part gets its own factor):
    GEMMs, prefill attention (SDPA over a chunk), decode attention (the paged kernel).
    What `time_of` prices; `services.scheduler.cost_model.step_cost` computes it."""

    linear_flops: float
    prefill_attn_flops: float
    decode_attn_flops: float
    weight_bytes: float
    kv_bytes: float
    num_seqs: int


@dataclass(frozen=True, slots=True)
class HardwareProfile:
    name: str
    peak_flops: dict[str, float]
    """Dense peak FLOP/s per dtype name (`bfloat16`, `float32`, ...)."""
    mem_bw: float
    """Device memory bandwidth, bytes/s."""
    interconnect_bw: float
    """Bytes/s between two instances, for KV transfer (prefill → decode)."""
    memory_bytes: float
    """Device memory of one instance."""
    kv_cache_bytes: float = 0.0
    """Memory for the KV pool; 0 = 90% of `memory_bytes` minus the weights."""
    transfer_latency: float = 50e-6
    """Fixed cost of one KV transfer (setup, notification), seconds."""
    host_kv_bw: float = 10 * GB
    """Bytes/s of a KV block copied from host memory into the device pool (PCIe, or a
    memcpy where the device is the host)."""
    disk_kv_bw: float = 1 * GB
    """Bytes/s of a KV block read from the disk tier (a local NVMe)."""
    overhead: float = 0.0
    """Seconds every step pays (scheduling, launches, sampling)."""
    per_seq: float = 0.0
    """Seconds per sequence in the batch (metadata, sampling)."""
    linear_factor: float = 1.0
    attn_factor: float = 1.0
    decode_attn_factor: float = 1.0
    weight_factor: float = 1.0
    kv_factor: float = 1.0
    overlap: float = 0.0
    source: str = ""
    """Where the numbers come from (spec sheet, or the calibration that fitted them)."""
    fit: dict[str, float] = field(default_factory=dict)
    """Calibration quality: relative errors on training and held-out shapes."""

    def peak(self, dtype: str) -> float:
        return self.peak_flops.get(dtype) or max(self.peak_flops.values())

    def time_of(self, cost: StepCost, dtype: str) -> float:
        peak = self.peak(dtype)
        compute = (
            self.linear_factor * cost.linear_flops
            + self.attn_factor * cost.prefill_attn_flops
            + self.decode_attn_factor * cost.decode_attn_flops
        ) / peak
        memory = (
            self.weight_factor * cost.weight_bytes + self.kv_factor * cost.kv_bytes
        ) / self.mem_bw
        roofline = max(compute, memory) + self.overlap * min(compute, memory)
        return self.overhead + self.per_seq * cost.num_seqs + roofline

    def tier_bandwidth(self) -> dict[str, float]:
        """Bytes/s into the device pool from each KV tier: the cluster store and a peer are
        reached over the link between instances (`interconnect_bw`)."""
        return {
            "device": float("inf"),
            "host": self.host_kv_bw,
            "disk": self.disk_kv_bw,
            "store": self.interconnect_bw,
        }

    def with_factors(self, **factors: float) -> HardwareProfile:
        return replace(self, **factors)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def from_json(cls, path: str | Path) -> HardwareProfile:
        return cls(**json.loads(Path(path).read_text()))


# Efficiencies assumed for the spec-sheet profiles (not measured here): large GEMMs reach
# ~60% of peak and attention ~40%; streaming reads ~80% of peak bandwidth; a step pays
# ~3 ms of host overhead (vLLM-class schedulers without CUDA graphs) and ~20 µs per sequence.
_GPU_FACTORS = dict(
    overhead=3e-3,
    per_seq=20e-6,
    linear_factor=1 / 0.6,
    attn_factor=1 / 0.4,
    decode_attn_factor=1 / 0.4,
    weight_factor=1 / 0.8,
    kv_factor=1 / 0.8,
    overlap=0.0,
)

SPEC_PROFILES = {
    # NVIDIA A100 SXM4 80GB datasheet: 312 TFLOPS BF16/FP16 dense (Tensor Core), 19.5 TFLOPS
    # FP32 (156 TF32), HBM2e 2,039 GB/s. KV between nodes over one HDR InfiniBand NIC
    # (200 Gb/s = 25 GB/s), the usual one-NIC-per-GPU layout of DGX A100.
    "a100": HardwareProfile(
        name="a100",
        peak_flops={"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
        mem_bw=2039 * GB,
        interconnect_bw=25 * GB,
        memory_bytes=80 * GB,
        host_kv_bw=25 * GB,  # PCIe 4.0 x16: 32 GB/s raw, ~25 GB/s pinned copies
        disk_kv_bw=6 * GB,  # one PCIe 4.0 NVMe, sequential read
        source="NVIDIA A100 80GB SXM datasheet; efficiencies assumed (see hardware.py)",
        **_GPU_FACTORS,
    ),
    # NVIDIA H100 SXM5 80GB datasheet: 989 TFLOPS BF16 dense (1,979 with sparsity), 494.5
    # TF32 dense, HBM3 3.35 TB/s. KV over one NDR InfiniBand NIC per GPU (400 Gb/s = 50 GB/s).
    "h100": HardwareProfile(
        name="h100",
        peak_flops={"bfloat16": 989e12, "float16": 989e12, "float32": 494.5e12},
        mem_bw=3350 * GB,
        interconnect_bw=50 * GB,
        memory_bytes=80 * GB,
        host_kv_bw=50 * GB,  # PCIe 5.0 x16: 64 GB/s raw
        disk_kv_bw=12 * GB,  # one PCIe 5.0 NVMe, sequential read
        source="NVIDIA H100 SXM datasheet; efficiencies assumed (see hardware.py)",
        **_GPU_FACTORS,
    ),
    # Huawei Ascend 910B: Huawei publishes no full datasheet; the widely reported figures are
    # ~320 TFLOPS FP16/BF16, 64 GB HBM2e at ~1.6 TB/s, and 200 GbE RoCE per NPU (25 GB/s)
    # for traffic between servers (HCCS at 392 GB/s inside one). Treat as approximate.
    "ascend-910b": HardwareProfile(
        name="ascend-910b",
        peak_flops={"bfloat16": 320e12, "float16": 320e12, "float32": 80e12},
        mem_bw=1600 * GB,
        interconnect_bw=25 * GB,
        memory_bytes=64 * GB,
        host_kv_bw=25 * GB,  # PCIe 4.0 x16 host link (approximate, as the rest)
        disk_kv_bw=6 * GB,
        source="Ascend 910B publicly reported figures (approximate); efficiencies assumed",
        **_GPU_FACTORS,
    ),
}


UNPROFILED_TIER_BANDWIDTH = {
    "device": float("inf"),
    "host": 10 * GB,
    "disk": 1 * GB,
    "store": 1.25 * GB,
}
"""What the scheduler prices tiers with when no `--cost-profile` says (host memory copy, a
local NVMe read, a 10 GbE fetch from another machine's store segment)."""


def tier_bandwidth(profile: HardwareProfile | None) -> dict[str, float]:
    return profile.tier_bandwidth() if profile else dict(UNPROFILED_TIER_BANDWIDTH)


def builtin_names() -> list[str]:
    return sorted({*SPEC_PROFILES, *(p.stem for p in PROFILES_DIR.glob("*.json"))})


def load_profile(name_or_path: str) -> HardwareProfile:
    """A built-in profile by name (`a100`, `cpu-local`, ...) or a profile JSON file."""
    if name_or_path in SPEC_PROFILES:
        return SPEC_PROFILES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        path = PROFILES_DIR / f"{name_or_path}.json"
    if not path.is_file():
        raise ValueError(f"no hardware profile {name_or_path!r}; built-in: {builtin_names()}")
    return HardwareProfile.from_json(path)
