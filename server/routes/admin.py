"""Adapter admin routes: list and inspect adapters, vLLM-compatible load and unload.

The operator drives hot-loading through these (DESIGN.md §3): it lists what a pod reports
and loads or unloads the difference. Errors use `{"error", "error_type"}`; validation and
not-found are 4xx, failures on our side 5xx.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from loraplex.server.api_schemas import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from loraplex.server.engine_api import AdapterInfo, EngineError, LoadAdapterSpec
from loraplex.server.routes.context import ServerContext, get_context
from loraplex.server.routes.errors import ApiError, read_json
from loraplex.server.routes.listing import Cursor


def adapter_json(info: AdapterInfo) -> dict[str, Any]:
    """All AdapterInfo fields in their order, snake_case, tuples as lists."""
    return {name: list(value) if isinstance(value, tuple) else value for name, value in vars(info).items()}


def adapter_report(ctx: ServerContext, info: AdapterInfo) -> dict[str, Any]:
    """What `/v1/adapters` says of one adapter, with its token totals as the HTTP layer counted
    them. An adapter the mounted keys file does not name yet answers 401 to everyone, so it is
    reported `loading`, not `ready`: the operator must not call it Ready before clients can
    reach it."""
    report = adapter_json(info)
    if (totals := ctx.metrics.tokens_by_adapter.get(info.name)) is not None:
        report["prompt_tokens"], report["generated_tokens"] = totals.prompt, totals.generated
    report["access"] = ctx.access.access_of(info.name)
    if report["access"] == "pending" and report["state"] == "ready":
        report["state"] = "loading"
    return report


async def list_adapters(http: web.Request) -> web.Response:
    """Every adapter, or with `?since=<instance>:<revision>` (from an earlier answer) only those
    changed since and the names removed (`routes/listing.py`)."""
    ctx = get_context(http)
    try:
        since = Cursor.parse(http.query["since"]) if "since" in http.query else None
    except ValueError as error:
        raise ApiError(422, str(error), "validation", param="since") from error
    adapters = [adapter_report(ctx, info) for info in ctx.engine.list_adapters()]
    return web.json_response(ctx.listing.answer(adapters, since).to_json())


async def get_adapter(http: web.Request) -> web.Response:
    ctx = get_context(http)
    info = ctx.engine.get_adapter(http.match_info["name"])
    return web.json_response(adapter_report(ctx, info))


async def load_adapter(http: web.Request) -> web.Response:
    ctx = get_context(http)
    body = LoadLoraAdapterRequest.model_validate(await read_json(http))
    spec = LoadAdapterSpec(
        name=body.lora_name,
        source=body.lora_path,
        revision=body.revision,
        sha256=body.sha256,
        aliases=tuple(body.aliases),
        pinned=body.pinned,
        token=body.token,
    )
    try:
        info = await ctx.engine.load_adapter(spec)
    except EngineError as exc:
        ctx.metrics.adapter_loads.labels(exc.error_type).inc()
        raise
    ctx.metrics.adapter_loads.labels("ok").inc()
    ctx.access.declare_open(body.lora_name, body.open)
    return web.json_response(adapter_report(ctx, info))


async def unload_adapter(http: web.Request) -> web.Response:
    ctx = get_context(http)
    body = UnloadLoraAdapterRequest.model_validate(await read_json(http))
    try:
        await ctx.engine.unload_adapter(body.lora_name)
    except EngineError as exc:
        ctx.metrics.adapter_unloads.labels(exc.error_type).inc()
        raise
    ctx.metrics.adapter_unloads.labels("ok").inc()
    ctx.access.declare_open(body.lora_name, False)
    return web.json_response({"lora_name": body.lora_name, "unloaded": True})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/adapters", list_adapters)
    app.router.add_get("/v1/adapters/{name:.+}", get_adapter)
    app.router.add_post("/v1/load_lora_adapter", load_adapter)
    app.router.add_post("/v1/unload_lora_adapter", unload_adapter)
