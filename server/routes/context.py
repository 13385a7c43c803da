"""What every route handler reaches through `request.app`: the engine, settings and metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from loraplex.server.auth import AccessControl
from loraplex.server.engine_api import Engine, LoadAdapterSpec
from loraplex.server.metrics import Metrics
from loraplex.server.routes.blocking import MAX_BODY_BYTES, BlockingPool
from loraplex.server.routes.listing import AdapterListing


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-layer configuration; the engine has its own (`EngineConfig`)."""

    api_key: str | None = None  # when set, every route but probes, /metrics and /openapi.json needs it
    startup_adapters: tuple[LoadAdapterSpec, ...] = ()  # loaded in the background; /ready waits for them
    startup_load_concurrency: int = 4
    model_id: str | None = None  # what /info reports as model_id (the hub id); default: the served name
    default_max_new_tokens: int = 100  # TGI requests without max_new_tokens (capped by room left)
    info: Mapping[str, Any] = field(default_factory=dict)  # extra /info fields: dtype, device, limits
    adapter_keys_file: str | None = None  # per-adapter key digests (operator-written); watched
    adapter_keys_poll_s: float = 5.0


@dataclass
class StartupState:
    """Progress of the startup adapter loads, for /ready."""

    done: bool = False
    failed: dict[str, str] = field(default_factory=dict)  # name -> error


@dataclass
class ServerContext:
    engine: Engine
    settings: ServerSettings
    metrics: Metrics
    special_token_ids: frozenset[int]
    access: AccessControl = field(default_factory=lambda: AccessControl(None))
    startup: StartupState = field(default_factory=StartupState)
    started_at: float = field(default_factory=time.time)
    blocking: BlockingPool = field(default_factory=BlockingPool)  # tokenising, templates, large JSON
    body_limit: int = MAX_BODY_BYTES  # bytes; create_app ties it to max_input_tokens
    listing: AdapterListing = field(default_factory=AdapterListing)  # GET /v1/adapters?since=


CONTEXT = web.AppKey("loraplex_context", ServerContext)


def get_context(request: web.Request) -> ServerContext:
    return request.app[CONTEXT]
