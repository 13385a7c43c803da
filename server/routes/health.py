"""Probes and scraping: `GET /health` (liveness), `GET /ready` (readiness), `GET /metrics`."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from loraplex.server.metrics import CONTENT_TYPE
from loraplex.server.routes.context import get_context


@dataclass
class DrainState:
    """Set on SIGTERM: /ready turns 503 so endpoints and load balancers stop sending new work."""

    draining: bool = False


DRAIN = web.AppKey("loraplex_drain", DrainState)


async def health(http: web.Request) -> web.Response:
    """Liveness: 200 while the engine can serve; 503 with the reason when its thread is gone or
    its recent steps all failed (the rendered liveness probe restarts the pod then)."""
    state = get_context(http).engine.health()
    if not state.ok:
        return web.json_response({"status": "unhealthy", "reason": state.reason}, status=503)
    return web.json_response({"status": "ok"})


async def ready(http: web.Request) -> web.Response:
    """503 until every startup adapter was tried (failures are listed, and in /v1/adapters), and
    again from SIGTERM on, while in-flight requests finish."""
    startup = get_context(http).startup
    draining = http.app[DRAIN].draining
    ready = startup.done and not draining
    body = {"ready": ready, "draining": draining, "failed_adapters": startup.failed}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(http: web.Request) -> web.Response:
    body = get_context(http).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app[DRAIN] = DrainState()
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
