"""MooncakeReplicaReader: one-sided reads of Mooncake Store objects' replicas, for the
engine's store tier (`xllm.engine.kv_store.ReadReplica`).

A Mooncake Store `get` reads an object's first replica only. When the client whose segment
holds it has died, that read fails (TRANSFER_FAIL) for as long as the master still lists the
segment (its lease, ~10 s), even though other clients' segments hold copies. The store's
replica descriptors name each copy as (transport endpoint, address, size): this reader
fetches one with a Transfer Engine of its own (P2P handshake, TCP, as `MooncakeTransport`)
into a registered staging buffer, and returns its bytes.

The instance builds it (the runtime layer owns Mooncake transfers) and hands it to the
engine's store tier. Calls come from the tiers' one load worker thread, one at a time.
"""

from __future__ import annotations

import logging

import torch

from xllm.kv_transfer.base import KvTransferError
from xllm.kv_transfer.mooncake import P2P_HANDSHAKE, load_transfer_engine

log = logging.getLogger(__name__)

STAGING_BYTES = 4 << 20
"""The registered buffer reads land in; a KV block is far smaller (a larger one is refused)."""


class MooncakeReplicaReader:
    def __init__(self, hostname: str = "127.0.0.1", staging_bytes: int = STAGING_BYTES):
        self.engine = load_transfer_engine()()
        if self.engine.initialize(hostname, P2P_HANDSHAKE, "tcp", "") != 0:
            raise KvTransferError(f"Mooncake TCP transport failed to start on {hostname}")
        self.staging = torch.empty(staging_bytes, dtype=torch.uint8)
        self.address = self.staging.data_ptr()
        if self.engine.register_memory(self.address, staging_bytes) != 0:
            raise KvTransferError(f"cannot register a {staging_bytes}-byte staging buffer")

    def __call__(self, endpoint: str, address: int, size: int) -> bytes | None:
        """The `size` bytes at `address` of the segment served at `endpoint`, or None if
        that read failed (its client is gone) or does not fit the staging buffer."""
        if size > self.staging.numel():
            return None
        status = self.engine.transfer_sync_read(endpoint, self.address, address, size)
        if status != 0:
            log.info("reading a store replica at %s failed (%d)", endpoint, status)
            return None
        return self.staging[:size].numpy().tobytes()

    def close(self) -> None:
        self.engine.unregister_memory(self.address)
