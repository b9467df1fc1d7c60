"""The EPD profiler's measurements of a request's trips between processes, on this machine.

  * A NATS message: the median round trip of a small request/reply through a nats-server
    (the one given, else one started for the measurement), as the gateway, the scheduler,
    the encoders and the instances exchange them; half of it is one message.
  * A Mooncake read: two local transfer engines (`xllm.kv_transfer.embeddings`, the
    encoder's and a reader's), the reader fetching registered buffers of a small and a
    large size, as an instance reads an image's embeddings (the KV handoff's writes go
    through the same TCP transport); the line through them gives a fixed latency and a
    bandwidth.

Each is the median of a few repeats, wall time (what a request waits), so on a loaded
machine they come out slower, as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Callable

from services.scheduler.sim.epd_profile import HopCost, fit_transfer

REQUEST_BYTES = 256
"""About a placement command's size (msgpack), without images."""


async def _nats_rtt(url: str, repeats: int) -> float:
    import nats

    nc = await nats.connect(url, connect_timeout=10)
    try:
        inbox = nc.new_inbox()

        async def echo(msg) -> None:
            await msg.respond(msg.data)

        await nc.subscribe(inbox, cb=echo)
        payload = bytes(REQUEST_BYTES)
        await nc.request(inbox, payload, timeout=10)  # warm: the subscription, the buffers
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            await nc.request(inbox, payload, timeout=10)
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    finally:
        await nc.close()


def nats_rtt(url: str = "", repeats: int = 50) -> float:
    """Median seconds of a small request/reply through `url`'s server (empty: a nats-server
    started for it)."""
    with contextlib.ExitStack() as stack:
        if not url:
            from xllm.cli.cluster.embedded import start_nats

            url = stack.enter_context(start_nats(jetstream=False)).url
        return asyncio.run(_nats_rtt(url, repeats))


def mooncake_reads(sizes: list[int], repeats: int = 5) -> list[tuple[int, float]]:
    """(bytes, median seconds) of a Mooncake read of each size between two local engines."""
    import torch

    from xllm.kv_transfer.embeddings import EmbeddingExchange

    source, reader = EmbeddingExchange(), EmbeddingExchange()
    out = []
    for nbytes in sizes:
        tensor = torch.zeros(max(1, nbytes // 4), dtype=torch.float32)
        source.register(tensor)
        try:
            ref = source.ref(tensor, (1, 1, 1), content_hash=nbytes)
            reader.fetch(ref)  # warm: the handshake with the peer
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                reader.fetch(ref)
                times.append(time.perf_counter() - start)
            out.append((tensor.nbytes, statistics.median(times)))
        finally:
            source.unregister(tensor)
    return out


def measure_hops(
    embedding_bytes: int, nats_url: str = "", log: Callable[[str], None] = lambda _: None
) -> HopCost:
    """The NATS message and the Mooncake read, for transfers around `embedding_bytes` (an
    image's embeddings, at least 64 KiB: reads of it and of 64 x it, a prompt's KV's size,
    well past the fixed cost)."""
    rtt = nats_rtt(nats_url)
    log(f"NATS request/reply: {rtt * 1e3:.3f} ms")
    small = max(1 << 16, embedding_bytes)
    reads = mooncake_reads([small, 64 * small], repeats=9)
    for nbytes, seconds in reads:
        log(f"Mooncake read of {nbytes} bytes: {seconds * 1e3:.3f} ms")
    latency, bandwidth = fit_transfer(reads)
    log(f"Mooncake read: {latency * 1e3:.3f} ms + {bandwidth / 1e9:.2f} GB/s")
    return HopCost(nats_rtt=rtt, transfer_latency=latency, transfer_bw=bandwidth)
