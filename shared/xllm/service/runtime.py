"""How every service process lives: start → run until signalled → drain → close.

A service is one coroutine `serve(nc, stop)`: it subscribes, starts its tasks, waits on
`stop` and cleans up what it started. `run_service` owns everything around it — logging,
uvloop, the NATS connection (retried until the server is up), SIGINT/SIGTERM, and draining
the connection at the end — so no service repeats it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable

import nats
from nats.aio.client import Client as NATS

from xllm.config import LogConfig, NatsConfig

log = logging.getLogger(__name__)

Serve = Callable[[NATS, asyncio.Event], Awaitable[None]]


def setup_logging(config: LogConfig, name: str) -> None:
    logging.basicConfig(
        level=config.log_level.upper(),
        format=f"%(asctime)s %(levelname)s {name} %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


async def connect_nats(config: NatsConfig, name: str) -> NATS:
    """Connect, retrying until the server answers or `nats_connect_timeout` passes."""
    deadline = time.monotonic() + config.nats_connect_timeout
    servers = [s.strip() for s in config.nats_url.split(",") if s.strip()]
    while True:
        try:
            return await nats.connect(
                servers=servers,
                name=name,
                connect_timeout=2,
                max_reconnect_attempts=-1,
                reconnect_time_wait=0.5,
            )
        except Exception as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cannot reach NATS at {config.nats_url}: {e}") from e
            await asyncio.sleep(0.3)


async def _run(name: str, serve: Serve, nats_config: NatsConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    nc = await connect_nats(nats_config, name)
    log.info("%s connected to %s", name, nc.connected_url.netloc if nc.connected_url else "?")
    try:
        await serve(nc, stop)
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.drain(), timeout=5)
        log.info("%s stopped", name)


def run_service(name: str, serve: Serve, nats_config: NatsConfig, log_config: LogConfig) -> int:
    """Run `serve` on uvloop until SIGINT/SIGTERM; returns the process exit code."""
    import uvloop

    setup_logging(log_config, name)
    try:
        uvloop.run(_run(name, serve, nats_config))
    except RuntimeError as e:
        log.error("%s", e)
        return 1
    return 0
