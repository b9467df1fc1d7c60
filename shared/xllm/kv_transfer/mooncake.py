"""MooncakeTransport: an engine's KV pool on the Mooncake Transfer Engine (TCP), block writes
to a peer (the `KvTransport` of `base.py`, between processes).

Design notes.

  * P2P handshake, no metadata server. `initialize(host, "P2PHANDSHAKE", "tcp", "")` makes
    the engine listen on an RPC port of its own choosing; peers address it as
    "host:rpc_port" and fetch its segment descriptor (the registered buffers) from it
    directly on first use. So no etcd/Redis/HTTP metadata service has to run, and an
    instance advertises one string, `endpoint`, in its heartbeat. The pool's base address
    and layout travel with the decode instance's reservation (`KvPeer`).
  * The sender writes into blocks the receiver reserved. The decode instance allocates
    the blocks first (so the request can never be admitted without room), the prefill
    instance pushes its KV straight into them with one-sided writes, then tells the
    decode instance over NATS. The receiver runs no code per transfer, and nothing is
    staged in between: the bytes land where decode attention reads them.
  * Overlap. Writes release the GIL, and `submit` runs them on a per-peer writer thread, so
    a request's KV travels while the engine keeps stepping the other requests (the
    request's blocks are held, so nothing overwrites them meanwhile). Shipping a long
    prompt's blocks chunk by chunk, before its prefill ends, would fit the same call;
    it is not done yet because a preempted prefill frees blocks a write may be reading.
    Within a transfer, consecutive block ids are merged into one write per (layer, K/V)
    plane (`layout.block_segments`).
  * Counting. The receiver cannot observe one-sided writes, so the sender counts the
    bytes it wrote and the receiver counts the bytes of the blocks it expected
    (`record_received`, called when the notification arrives); tests compare the two.
  * Abort. A transfer still queued on its peer's writer thread is cancelled (its future
    never runs); one that is writing runs to its end: Mooncake's synchronous batch write
    cannot be interrupted.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch

from xllm.kv_transfer.base import KvTransfer, KvTransferError, count_received, count_sent
from xllm.kv_transfer.layout import block_segments, layout_of
from xllm.protocol.kv_peer import KvPeer
from xllm.protocol.stats import KvTransferStats

P2P_HANDSHAKE = "P2PHANDSHAKE"

MAX_BATCH_BYTES = 16 << 20
"""Bytes per Mooncake batch. Its TCP transport queues a batch's slices per peer, in a bounded
queue (MC_TCP_MAX_QUEUED_TRANSFERS_PER_PEER), and fails the batch when slices are turned
away ("TCP lane queue-full rejection"). One 112 MiB batch failed so on this loaded 2-core
machine (and passed when rerun); batches this size keep the queue short."""


def load_transfer_engine() -> type:
    """`mooncake.engine.TransferEngine`, or an error saying what to install."""
    try:
        from mooncake.engine import TransferEngine
    except ImportError as exc:
        if "ibverbs" in str(exc):
            hint = "install the Debian package libibverbs1 (apt-get install libibverbs1)"
        else:
            hint = "pip install 'xllm[mooncake]' (mooncake-transfer-engine-non-cuda on CPU)"
        raise KvTransferError(
            f"cannot import the Mooncake Transfer Engine ({exc}): {hint}"
        ) from exc
    return TransferEngine


class MooncakeTransport:
    """One engine's KV pool registered with Mooncake; writes its blocks into peers' pools."""

    def __init__(self, kv: torch.Tensor, block_size: int, hostname: str = "127.0.0.1"):
        """`kv` is the engine's pool [L, 2, num_slots, Hkv, D] (`KVCache.tensor`), on CPU."""
        self.layout = layout_of(kv, block_size)
        self.kv = kv  # keeps the registered memory alive
        self.base_addr = kv.data_ptr()
        self.engine = load_transfer_engine()()
        if self.engine.initialize(hostname, P2P_HANDSHAKE, "tcp", "") != 0:
            raise KvTransferError(f"Mooncake TCP transport failed to start on {hostname}")
        self.endpoint = f"{hostname}:{self.engine.get_rpc_port()}"
        if self.engine.register_memory(self.base_addr, self.layout.nbytes) != 0:
            raise KvTransferError(f"cannot register the KV pool ({self.layout.nbytes} bytes)")
        self.stats = KvTransferStats()
        self._writers: dict[str, ThreadPoolExecutor] = {}
        """One writer thread per peer: a peer that dies mid-write can hold its thread until
        TCP gives up (minutes), and must not hold up transfers to the other peers."""

    @property
    def peer(self) -> KvPeer:
        """This pool as a write target, to hand to senders."""
        return KvPeer(self.endpoint, self.base_addr, self.layout)

    def write_blocks(
        self, peer: KvPeer, local_block_ids: list[int], remote_block_ids: list[int]
    ) -> int:
        """Copy local blocks into the peer's blocks, pairwise; blocks until done.

        Returns the bytes written; raises KvTransferError when Mooncake reports a failure.
        """
        if not local_block_ids:
            return 0
        segments = block_segments(self.layout, peer.layout, local_block_ids, remote_block_ids)
        start = time.perf_counter()
        for batch in batches(segments, MAX_BATCH_BYTES):
            status = self.engine.batch_transfer_sync_write(
                peer.endpoint,
                [self.base_addr + src for src, _, _ in batch],
                [peer.base_addr + dst for _, dst, _ in batch],
                [length for _, _, length in batch],
            )
            if status != 0:
                raise KvTransferError(
                    f"writing {len(local_block_ids)} blocks to {peer.endpoint} failed ({status})"
                )
        elapsed = time.perf_counter() - start
        nbytes = sum(length for _, _, length in segments)
        count_sent(self.stats, len(local_block_ids), nbytes, len(segments), elapsed)
        return nbytes

    def submit(
        self, peer: KvPeer, local_block_ids: list[int], remote_block_ids: list[int]
    ) -> KvTransfer:
        """`write_blocks` on the peer's writer thread, so the caller can compute meanwhile.

        Transfers to one peer run one at a time in submission order. The caller must keep
        the local blocks unchanged (held) until the transfer is over.
        """
        writer = self._writers.get(peer.endpoint)
        if writer is None:
            writer = ThreadPoolExecutor(1, thread_name_prefix=f"kv-writer-{peer.endpoint}")
            self._writers[peer.endpoint] = writer
        local, remote = list(local_block_ids), list(remote_block_ids)
        return KvTransfer(writer.submit(self.write_blocks, peer, local, remote))

    def record_received(self, num_blocks: int) -> None:
        """Count blocks a peer wrote into this pool (called on its notification)."""
        count_received(self.stats, num_blocks, num_blocks * self.layout.block_bytes)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.shutdown(wait=False, cancel_futures=True)  # a dead peer's write may hang
        self.engine.unregister_memory(self.base_addr)


def batches(
    segments: list[tuple[int, int, int]], max_bytes: int
) -> list[list[tuple[int, int, int]]]:
    """Group (src, dst, length) segments into batches of at most `max_bytes`, cutting a
    segment that does not fit."""
    out: list[list[tuple[int, int, int]]] = [[]]
    room = max_bytes
    for src, dst, length in segments:
        while length:
            if room == 0:
                out.append([])
                room = max_bytes
            n = min(length, room)
            out[-1].append((src, dst, n))
            src, dst, length, room = src + n, dst + n, length - n, room - n
    return [batch for batch in out if batch]
