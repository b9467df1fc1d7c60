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


# Device graphs (graph mode on accelerators, engine/graph_runner.py): CUDA graphs, or
# torch_npu's NPUGraph, which mirrors their API.
def _graphs_module(device: torch.device):
    if device.type == "cuda":
        return torch.cuda
    if device.type == "npu":
        return torch.npu  # type: ignore[attr-defined]
    raise RuntimeError(f"device graphs need cuda or npu, not {device.type}")


def new_graph(device: torch.device):
    """An empty capturable graph: torch.cuda.CUDAGraph or torch.npu.NPUGraph."""
    module = _graphs_module(device)
    return module.CUDAGraph() if device.type == "cuda" else module.NPUGraph()


def capturing(graph, device: torch.device, pool=None):
    """Context manager recording the device work issued inside it into `graph`; graphs
    sharing `pool` share their memory (they never replay at the same time)."""
    return _graphs_module(device).graph(graph, pool=pool)


def graph_pool(graph):
    """`graph`'s memory pool, for the next capture to share."""
    return graph.pool()


def warm_up(device: torch.device, step, times: int = 2) -> None:
    """Run `step` on a side stream before capture (lazy inits, allocator warm-up), as
    CUDA graph capture requires."""
    module = _graphs_module(device)
    stream = module.Stream()
    stream.wait_stream(module.current_stream())
    with module.stream(stream):
        for _ in range(times):
            step()
    module.current_stream().wait_stream(stream)
    synchronize(device)
