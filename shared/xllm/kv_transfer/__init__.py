"""KV blocks between instances (PD disaggregation), behind one seam.

    base.py      KvTransport (KvSender + KvReceiver), KvTransfer, TransferState: submit / poll / abort
    layout.py    block ids -> byte runs of an engine's KV pool (`KvLayout`, `block_segments`)
    mooncake.py  MooncakeTransport: the Mooncake Transfer Engine (TCP), between processes
    loopback.py  LoopbackTransport: a byte copy between two pools of one process (tests)

`open_transport` builds the backend an instance is configured with (`--kv-transfer-backend`,
`XLLM_KV_TRANSFER_BACKEND`); the instance gets it injected and never names a backend.
Importing this package loads neither torch nor Mooncake (the config reads `BACKENDS`); the
native library loads when a Mooncake transport is created.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from xllm.kv_transfer.base import KvTransfer, KvTransferError, KvTransport, TransferState

if TYPE_CHECKING:
    import torch

BACKENDS = ("mooncake", "loopback")
"""The names `--kv-transfer-backend` accepts."""

OpenTransport = Callable[["torch.Tensor", int], KvTransport]
"""Registers an engine's KV pool [L, 2, num_slots, Hkv, D] with its block size."""


def open_transport(backend: str, host: str = "") -> OpenTransport:
    """How to open the `backend` transport. `host` (Mooncake): the address peers reach this
    instance at; empty = the address this host's name resolves to (a container's own IP)."""
    if backend == "mooncake":
        from xllm.kv_transfer.mooncake import MooncakeTransport

        def open_mooncake(kv: torch.Tensor, block_size: int) -> KvTransport:
            address = host or socket.gethostbyname(socket.gethostname())
            return MooncakeTransport(kv, block_size, address)

        return open_mooncake
    if backend == "loopback":
        from xllm.kv_transfer.loopback import LoopbackTransport

        return LoopbackTransport
    raise ValueError(f"unknown KV transfer backend {backend!r}: one of {', '.join(BACKENDS)}")


__all__ = [
    "BACKENDS",
    "KvTransfer",
    "KvTransferError",
    "KvTransport",
    "OpenTransport",
    "TransferState",
    "open_transport",
]
