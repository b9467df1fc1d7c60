"""The gateway's per-process state, stored on the aiohttp app under the typed key `GATEWAY`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import nats.errors
from aiohttp import web
from nats.aio.client import Client as NATS

from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError
from services.gateway.metrics import GatewayMetrics
from services.gateway.model import ModelInfo
from services.gateway.streaming import Generation, GenerationRequest
from xllm.protocol import (
    ClusterState,
    ClusterStateRequest,
    DecodeError,
    ErrorCode,
    InstanceLost,
    ProtocolError,
    decode_as,
    encode,
    subjects,
)

log = logging.getLogger(__name__)

RECONNECT_POLL = 0.5
"""Seconds between looks at the NATS client's reconnect count."""


@dataclass
class Gateway:
    config: GatewayConfig
    nc: NATS
    model: ModelInfo
    metrics: GatewayMetrics = field(init=False)
    inflight: int = 0
    """Generation requests being served (the semaphore of --max-inflight)."""
    live: set[Generation] = field(default_factory=set)
    """Generations submitted and not yet ended: where `InstanceLost` notices go."""

    def __post_init__(self) -> None:
        self.metrics = GatewayMetrics(self.config)  # counts attainment against its SLO targets

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one of the --max-inflight slots; OVERLOADED (429) when none is free."""
        if self.inflight >= self.config.max_inflight:
            raise ApiError(
                ErrorCode.OVERLOADED,
                f"the server has {self.inflight} requests in flight (--max-inflight); retry later",
            )
        self.inflight += 1
        self.metrics.running.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= 1
            self.metrics.running.set(self.inflight)

    def generation(self, req: GenerationRequest) -> Generation:
        return Generation(
            self.nc,
            self.model,
            req,
            submit_timeout=self.config.submit_timeout,
            placement_wait=self.config.placement_wait,
            timeout=self.config.request_timeout,
            live=self.live,
        )

    async def watch_reconnects(self) -> None:
        """After NATS reconnects (a restart of nats-server, a network blip), resume every
        running generation from the tokens it has: deltas published while this gateway was
        away are lost, and waiting for them would hang the request until its timeout."""
        seen = self.nc.stats["reconnects"]
        while True:
            await asyncio.sleep(RECONNECT_POLL)
            if self.nc.stats["reconnects"] != seen and self.nc.is_connected:
                seen = self.nc.stats["reconnects"]
                log.warning("NATS reconnected: resuming %d running requests", len(self.live))
                for generation in list(self.live):
                    generation.bus_reconnected()

    async def on_instance_lost(self, notice: InstanceLost) -> None:
        for generation in list(self.live):
            generation.instance_lost(notice)

    async def cluster_state(self) -> ClusterState:
        """The scheduler's view of the cluster; ProtocolError(NO_INSTANCE) if none answers."""
        if not self.nc.is_connected:
            raise ProtocolError(ErrorCode.NO_INSTANCE, "the gateway is not connected to NATS")
        try:
            msg = await self.nc.request(
                subjects.CLUSTER_STATE,
                encode(ClusterStateRequest()),
                timeout=self.config.cluster_timeout,
            )
            return decode_as(msg.data, ClusterState)
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            raise ProtocolError(ErrorCode.NO_INSTANCE, "no scheduler answered") from None
        except DecodeError as e:
            raise ProtocolError(ErrorCode.INTERNAL, f"bad cluster state: {e}") from e


GATEWAY = web.AppKey("gateway", Gateway)
