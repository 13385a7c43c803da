"""Optional Bearer API key: one shared secret, compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable

from aiohttp import web

from loraplex.server.routes.errors import ApiError

# Probes, scrapers and the API description stay open: kubelet and Prometheus carry no key.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_authorized(header: str | None, api_key: str) -> bool:
    scheme, _, token = (header or "").partition(" ")
    # compare_digest on bytes: constant time whatever the token holds (str needs ASCII).
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def auth_middleware(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Every route but PUBLIC_PATHS needs `Authorization: Bearer <api_key>` (401 otherwise)."""

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in PUBLIC_PATHS and not is_authorized(
            request.headers.get("Authorization"), api_key
        ):
            raise ApiError(
                401, "missing or invalid API key", "authentication", headers={"WWW-Authenticate": "Bearer"}
            )
        return await handler(request)

    return check_api_key
