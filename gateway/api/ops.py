"""Probes and metrics: liveness, readiness (store, broker when configured), Prometheus."""

from __future__ import annotations

from aiohttp import web

from gateway.api.problems import json_response
from gateway.api.services import SERVICES
from gateway.errors import Unavailable
from gateway.store.base import OutboundState

PROMETHEUS_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    checks: dict[str, str] = {}
    try:
        await services.store.ping()
        checks["store"] = "ok"
    except Unavailable as exc:
        checks["store"] = f"unavailable: {exc.reason}"
    if services.broker_ping is not None:
        try:
            await services.broker_ping()
            checks["broker"] = "ok"
        except Unavailable as exc:
            checks["broker"] = f"unavailable: {exc.reason}"
    ready = all(value == "ok" for value in checks.values())
    return json_response(
        {"status": "ready" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    if services.metrics is None:
        return web.Response(body=b"", headers={"Content-Type": PROMETHEUS_TYPE})
    # the store unavailable, these gauges keep the values of the last scrape that read it
    try:
        depth = await services.store.outbox_depth()
    except Unavailable:
        pass
    else:
        for state in OutboundState:
            services.metrics.outbox_depth.labels(state.value).set(depth.get(state, 0))
    try:
        backlog = await services.store.outbox_backlog()
    except Unavailable:
        pass
    else:
        services.metrics.show_backlog(backlog, services.clock.now())
    return web.Response(body=services.metrics.render(), headers={"Content-Type": PROMETHEUS_TYPE})
