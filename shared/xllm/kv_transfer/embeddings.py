"""Image embeddings between an encoder instance and the instance that runs the prompt, out
of band through the Mooncake Transfer Engine (TCP), like KV blocks.

The encoder registers each cached image's embeddings with its transfer engine and hands out
an `EmbeddingRef` (endpoint, address, size, shape) in its NATS reply; the prompt's instance
reads the bytes with a one-sided read into memory of its own. Reading (rather than the
encoder writing into a reservation, as KV blocks do) keeps the encode step to one round
trip: the reader allocates when it knows the size, and the encoder runs no code per read.
The encoder keeps an entry registered for a grace period after evicting it
(`xllm.encoder.cache`), so a read of a ref just handed out never meets freed memory.

Counting: the encoder counts the bytes it handed out, the reader the bytes it read; tests
compare the two. Same P2P handshake as `mooncake.py` (no metadata server).
"""

from __future__ import annotations

import threading

import torch

from xllm.kv_transfer.base import KvTransferError
from xllm.kv_transfer.mooncake import P2P_HANDSHAKE, load_transfer_engine
from xllm.protocol.stats import EncoderStats
from xllm.protocol.types import EmbeddingRef


class EmbeddingExchange:
    """One process's Mooncake engine for embeddings: publish (encoder) and fetch (reader)."""

    def __init__(self, hostname: str = "127.0.0.1"):
        self.engine = load_transfer_engine()()
        if self.engine.initialize(hostname, P2P_HANDSHAKE, "tcp", "") != 0:
            raise KvTransferError(f"Mooncake TCP transport failed to start on {hostname}")
        self.endpoint = f"{hostname}:{self.engine.get_rpc_port()}"
        self._lock = threading.Lock()  # fetches run on worker threads

    def register(self, tensor: torch.Tensor) -> None:
        """Make `tensor` (contiguous, kept alive by the caller) readable by peers."""
        if self.engine.register_memory(tensor.data_ptr(), tensor.nbytes) != 0:
            raise KvTransferError(f"cannot register {tensor.nbytes} bytes of embeddings")

    def unregister(self, tensor: torch.Tensor) -> None:
        self.engine.unregister_memory(tensor.data_ptr())

    def ref(self, tensor: torch.Tensor, grid_thw, content_hash: int) -> EmbeddingRef:
        """The descriptor of a registered tensor, for a reader elsewhere."""
        return EmbeddingRef(
            endpoint=self.endpoint,
            addr=tensor.data_ptr(),
            nbytes=tensor.nbytes,
            shape=list(tensor.shape),
            dtype=str(tensor.dtype).removeprefix("torch."),
            grid_thw=list(grid_thw),
            content_hash=content_hash,
        )

    def fetch(self, ref: EmbeddingRef, stats: EncoderStats | None = None) -> torch.Tensor:
        """Read the embeddings `ref` names into a new tensor (blocks; call off the loop)."""
        dtype = getattr(torch, ref.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise KvTransferError(f"embeddings of unknown dtype {ref.dtype!r}")
        out = torch.empty(ref.shape, dtype=dtype)
        if out.nbytes != ref.nbytes:
            raise KvTransferError(f"embeddings of shape {ref.shape} are not {ref.nbytes} bytes")
        self.register(out)
        try:
            status = self.engine.batch_transfer_sync_read(
                ref.endpoint, [out.data_ptr()], [ref.addr], [ref.nbytes]
            )
        finally:
            self.unregister(out)
        if status != 0:
            raise KvTransferError(f"reading {ref.nbytes} bytes from {ref.endpoint} failed")
        if stats is not None:
            with self._lock:
                stats.bytes_fetched += ref.nbytes
                stats.images_fetched += 1
        return out
