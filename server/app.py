"""The aiohttp application: routes of every API family over one `Engine` (DESIGN.md §4).

`create_app(engine, settings)` only wires things; the engine's lifecycle (start, shutdown)
belongs to the caller (`serve_cli`, tests). Startup adapters load in the background so
liveness answers at once and `/ready` turns 200 when they were all tried.

Run it with `web.AppRunner(app, handler_cancellation=True)`: then a client that hangs up during
a non-streamed request cancels its handler, which aborts the request in the engine (streams
notice the hang-up on their next write either way).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from loraplex.server.auth import AccessControl, AccessKeysWatcher, AccessTable, auth_middleware
from loraplex.server.engine_api import Engine, EngineError, LoadAdapterSpec
from loraplex.server.metrics import Metrics
from loraplex.server.openapi import build_openapi
from loraplex.server.routes import admin, health, openai, tgi
from loraplex.server.routes.blocking import body_limit
from loraplex.server.routes.context import CONTEXT, ServerContext, ServerSettings, get_context
from loraplex.server.routes.errors import error_middleware

__all__ = ["ServerSettings", "create_app"]

log = logging.getLogger(__name__)


def create_app(engine: Engine, settings: ServerSettings | None = None) -> web.Application:
    settings = settings or ServerSettings()
    # Fail closed until the keys file was read: every adapter counts as protected.
    table = AccessTable(loaded=False) if settings.adapter_keys_file else AccessTable()
    access = AccessControl(settings.api_key, table)
    ctx = ServerContext(
        engine=engine,
        settings=settings,
        metrics=Metrics(engine.stats, engine.model_name, engine.max_total_tokens),
        special_token_ids=frozenset(getattr(engine.tokenizer, "all_special_ids", ())),
        access=access,
        body_limit=body_limit(engine.max_input_tokens),
    )
    ctx.metrics.watch_engine(engine)
    # Outermost first: count every response, render every error, then check the key.
    middlewares: list[Any] = [_count_requests, error_middleware]
    middlewares.append(auth_middleware(access))
    app = web.Application(middlewares=middlewares, client_max_size=ctx.body_limit)
    app[CONTEXT] = ctx
    app.on_cleanup.append(_close_blocking_pool)
    for routes in (tgi, openai, admin, health):
        routes.add_routes(app)
    openapi_document = build_openapi()

    async def openapi_json(_: web.Request) -> web.Response:
        return web.json_response(openapi_document)

    app.router.add_get("/openapi.json", openapi_json)
    if settings.adapter_keys_file:
        watcher = AccessKeysWatcher(Path(settings.adapter_keys_file), access, settings.adapter_keys_poll_s)
        app.cleanup_ctx.append(watcher.cleanup_ctx)
    app.cleanup_ctx.append(_startup_adapters)
    return app


async def _close_blocking_pool(app: web.Application) -> None:
    app[CONTEXT].blocking.close()


@web.middleware
async def _count_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    response = await handler(request)
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"  # bounded label values
    get_context(request).metrics.http_requests.labels(route, str(response.status)).inc()
    return response


async def _startup_adapters(app: web.Application) -> AsyncIterator[None]:
    ctx = app[CONTEXT]
    task = asyncio.create_task(load_startup_adapters(ctx))
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def load_startup_adapters(ctx: ServerContext) -> None:
    """Load every startup adapter (a few at a time); a failure is recorded, never fatal."""
    limit = asyncio.Semaphore(max(1, ctx.settings.startup_load_concurrency))

    async def load(spec: LoadAdapterSpec) -> None:
        async with limit:
            try:
                info = await ctx.engine.load_adapter(spec)
            except EngineError as exc:
                ctx.startup.failed[spec.name] = str(exc)
                ctx.metrics.adapter_loads.labels(exc.error_type).inc()
                log.error("startup adapter failed", extra={"adapter": spec.name, "error": str(exc)})
                return
            ctx.metrics.adapter_loads.labels("ok").inc()
            log.info(
                "startup adapter loaded", extra={"adapter": info.name, "rank": info.rank, "tier": info.tier}
            )

    await asyncio.gather(*(load(spec) for spec in ctx.settings.startup_adapters))
    ctx.startup.done = True
