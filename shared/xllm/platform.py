"""Where the engine runs: CUDA, Ascend NPU (torch_npu, when importable) or CPU.

The rest of the code asks this module for a device and never branches on hardware itself.
"""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)


def npu_available() -> bool:
    if importlib.util.find_spec("torch_npu") is None:
        return False
    import torch_npu  # noqa: F401  (registers the "npu" device with torch)

    return torch.npu.is_available()  # type: ignore[attr-defined]


def select_device(name: str = "auto") -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif npu_available():
            name = "npu"
        else:
            name = "cpu"
    if name == "npu" and not npu_available():
        raise RuntimeError("device npu requested but torch_npu is not installed or sees no NPU")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device cuda requested but torch sees no CUDA device")
    return torch.device(name)


def default_dtype(device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype:
    """The checkpoint's dtype, except float16 on CPU (slow there): bfloat16 instead."""
    if device.type == "cpu" and checkpoint_dtype == torch.float16:
        return torch.bfloat16
    return checkpoint_dtype


def pins_host_memory(device: torch.device) -> bool:
    """Whether host buffers that copy to and from `device` should be pinned (page-locked):
    yes for accelerators (DMA), no for the CPU, where there is nothing to gain."""
    return device.type in ("cuda", "npu")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)  # type: ignore[attr-defined]
