"""The gateway's aiohttp application: middlewares, routes, lifecycle.

    app = create_app(config, nc)          # state is built in cleanup_ctx, at startup
    await serve_http(config, nc, stop)    # the service: listen until `stop` is set

Middlewares, outermost first: request metrics → OpenAI error bodies → API key. Routes:
the OpenAI ones (openai_routes) plus /health, /metrics and /cluster, which need no key.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import logging
from collections.abc import AsyncIterator

from aiohttp import web
from nats.aio.client import Client as NATS

from services.gateway import batches, openai_routes
from services.gateway.config import GatewayConfig
from services.gateway.errors import ApiError, error_middleware
from services.gateway.metrics import prefix_cache_summary
from services.gateway.model import ModelInfo
from services.gateway.offline import OfflineWorker
from services.gateway.prometheus import CONTENT_TYPE
from services.gateway.readiness import missing_roles, supervised_processes
from services.gateway.state import GATEWAY, Gateway
from xllm.protocol import (
    ErrorCode,
    InstanceLost,
    ProtocolError,
    TypeDispatcher,
    make_callback,
    subjects,
)

log = logging.getLogger(__name__)

AUTH_PREFIXES = ("/v1/", "/tokenize", "/detokenize")
"""Paths that need the API key (when one is configured); /health and /metrics never do."""

OFFLINE = web.AppKey("offline", OfflineWorker)

SHUTDOWN_TIMEOUT = 5.0
"""Seconds in-flight requests get to finish on shutdown before they are cancelled (and
aborted)."""


def create_app(config: GatewayConfig, nc: NATS, model: ModelInfo | None = None) -> web.Application:
    """The application; `model` is loaded from `config.model` at startup unless given."""
    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[metrics_middleware, error_middleware, auth_middleware(config.api_key)],
    )
    app.cleanup_ctx.append(_gateway_ctx(config, nc, model))
    openai_routes.add_routes(app)
    batches.add_routes(app)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/cluster", cluster)
    return app


def _gateway_ctx(config: GatewayConfig, nc: NATS, model: ModelInfo | None):
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        info = model or await asyncio.to_thread(
            ModelInfo.load, config.model, config.served_model_name, config.max_model_len
        )
        app[GATEWAY] = gateway = Gateway(config, nc, info)
        notices = TypeDispatcher({InstanceLost: gateway.on_instance_lost}, name="gateway notices")
        sub = await nc.subscribe(subjects.INSTANCE_LOST, cb=make_callback(notices))
        app[batches.STORE] = store = batches.BatchStore(nc)
        await store.open()
        driver = batches.BatchDriver(store, nc)
        app[OFFLINE] = worker = OfflineWorker(
            gateway, nc, config.offline_concurrency, cancelled=driver.cancelled
        )
        if config.offline_concurrency:
            await worker.start()
        tasks = [asyncio.create_task(gateway.watch_reconnects())]
        tasks.append(asyncio.create_task(driver.run()))
        log.info("serving %s (context %d tokens)", info.name, info.max_model_len)
        yield
        await worker.stop()
        for task in tasks:
            task.cancel()
        await sub.unsubscribe()
        # Handlers still running are cancelled by the runner; each aborts its request.

    return ctx


@web.middleware
async def metrics_middleware(request: web.Request, handler) -> web.StreamResponse:
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except (asyncio.CancelledError, ConnectionResetError):
        status = 499  # the client went away (nginx's code for it)
        raise
    finally:
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unmatched"
        request.app[GATEWAY].metrics.requests.labels(endpoint=endpoint, status=status).inc()


def auth_middleware(api_key: str):
    expected = f"Bearer {api_key}".encode()

    @web.middleware
    async def check(request: web.Request, handler) -> web.StreamResponse:
        if api_key and request.path.startswith(AUTH_PREFIXES):
            given = request.headers.get("Authorization")
            if given is None:
                raise ApiError(ErrorCode.UNAUTHORIZED, "missing `Authorization: Bearer <key>`")
            if not hmac.compare_digest(given.encode(), expected):
                raise ApiError(ErrorCode.UNAUTHORIZED, "incorrect API key provided")
        return await handler(request)

    return check


async def health(request: web.Request) -> web.Response:
    """200 when the cluster can serve a request: NATS connected, the scheduler answering,
    and live instances that can prefill and decode (`readiness`); else 503 saying what is
    missing. `?verbose` adds each instance's role and the supervisor's processes."""
    gw = request.app[GATEWAY]
    state = await gw.cluster_state()
    missing = missing_roles(state)
    if missing:
        roles = ", ".join(sorted({hb.role for hb in state.instances})) or "none"
        raise ProtocolError(
            ErrorCode.NO_INSTANCE,
            f"no live instance can {' or '.join(missing)} (live roles: {roles})",
        )
    body: dict = {"status": "ok", "instances": len(state.instances)}
    if "verbose" in request.query:
        body["roles"] = {hb.instance_id: hb.role for hb in state.instances}
        body["processes"] = supervised_processes(gw.config.supervisor_state)
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    gw = request.app[GATEWAY]
    try:
        state = await gw.cluster_state()
    except ProtocolError:
        state = None  # the gateway's own metrics are still worth scraping
    gw.metrics.observe_cluster(state)
    gw.metrics.observe_processes(supervised_processes(gw.config.supervisor_state))
    queued = await request.app[OFFLINE].queued()
    if queued is not None:
        gw.metrics.offline_queued.set(queued)
    return web.Response(body=gw.metrics.render().encode(), headers={"Content-Type": CONTENT_TYPE})


async def cluster(request: web.Request) -> web.Response:
    """The scheduler's `ClusterState` as JSON: every instance's role, load and counters,
    the cluster-wide prefix-cache hit rate, and the supervisor's processes (`xllm up`)."""
    gw = request.app[GATEWAY]
    state = await gw.cluster_state()
    return web.json_response(
        {
            **dataclasses.asdict(state),
            "prefix_cache": prefix_cache_summary(state),
            "processes": supervised_processes(gw.config.supervisor_state),
        }
    )


async def serve_http(config: GatewayConfig, nc: NATS, stop: asyncio.Event) -> None:
    """Listen on config.host:port until `stop` is set; then drain and close."""
    runner = web.AppRunner(create_app(config, nc), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await site.start()
        log.info("gateway listening on http://%s:%d", config.host, config.port)
        await stop.wait()
    finally:
        await runner.cleanup()
