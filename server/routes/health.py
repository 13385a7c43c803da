"""Probes and scraping: `GET /health` (liveness), `GET /ready` (readiness), `GET /metrics`."""

from __future__ import annotations

from aiohttp import web

from loraplex.server.metrics import CONTENT_TYPE
from loraplex.server.routes.context import get_context


async def health(http: web.Request) -> web.Response:
    """Alive once the app serves: the model was loaded before the app was built."""
    return web.json_response({"status": "ok"})


async def ready(http: web.Request) -> web.Response:
    """503 until every startup adapter was tried; failures are listed (and in /v1/adapters)."""
    startup = get_context(http).startup
    body = {"ready": startup.done, "failed_adapters": startup.failed}
    return web.json_response(body, status=200 if startup.done else 503)


async def metrics(http: web.Request) -> web.Response:
    body = get_context(http).metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
