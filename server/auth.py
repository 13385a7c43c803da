"""Who may call what: the deployment's Bearer key and per-adapter access keys (DESIGN.md §4).

The operator mounts a file (`ADAPTER_KEYS_FILE`) holding, per served adapter name, only
HMAC-SHA256 digests of that adapter's keys under one random per-deployment salt (see
`loraplex.operator.access` for why that and not a slow KDF). A request's token is digested
once and compared in constant time with every digest. Rules:

- an adapter with keys in the file needs one of them: a valid key of anything else (another
  adapter's, the deployment key) is 403, no or an unknown key 401;
- the base model, and the adapters the file lists as `open` (every adapter when no file is
  configured), follow the deployment key (`API_KEY`), or are open when there is none;
- with a file, an adapter it does not name yet (loaded before the kubelet refreshed the mount)
  is closed, unless its load (an admin call) declared it open: the operator knows at load
  time what the file will say, and the mount can lag a minute; until the file could be read
  once every adapter is closed (fail closed);
- admin routes (`/v1/adapters`, load, unload) need the deployment key when there is one.

Keys and digests never reach logs, metrics or error messages: errors name the adapter only.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from loraplex.server.routes.errors import ApiError

log = logging.getLogger(__name__)

# Probes, scrapers and the API description stay open: kubelet and Prometheus carry no key.
PUBLIC_PATHS = frozenset({"/health", "/ready", "/metrics", "/openapi.json"})
ADMIN_PATHS = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
ADMIN_PREFIX = "/v1/adapters"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def is_authorized(header: str | None, api_key: str) -> bool:
    """`header` is `Bearer <api_key>`, compared in constant time."""
    scheme, _, token = (header or "").partition(" ")
    # compare_digest on bytes: constant time whatever the token holds (str needs ASCII).
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def digest_key(salt: bytes, key: str) -> str:
    """The stored form of a key: hex HMAC-SHA256 under the deployment's salt."""
    return hmac.new(salt, key.encode(), hashlib.sha256).hexdigest()


@dataclass(frozen=True)
class AccessTable:
    """Adapter name -> digests of the keys that open it. `loaded=False`: every adapter protected."""

    salt: bytes = b""
    digests: Mapping[str, frozenset[str]] = field(default_factory=dict)
    open: frozenset[str] | None = None  # from a file: only these follow the deployment key
    loaded: bool = True

    @classmethod
    def from_json(cls, text: str) -> AccessTable:
        """`{"salt": hex, "adapters": {name: [hex digest]}, "open": [name]}` (operator-written)."""
        data = json.loads(text)
        adapters = data.get("adapters") or {}
        return cls(
            salt=bytes.fromhex(data["salt"]),
            digests={str(name): frozenset(map(str, values)) for name, values in adapters.items()},
            open=frozenset(map(str, data.get("open") or ())),
        )

    def is_protected(self, adapter: str) -> bool:
        """With a file, an adapter it does not name yet is protected: one loaded before the
        kubelet refreshed the mount is closed, never open, until its entry arrives."""
        if not self.loaded or adapter in self.digests:
            return True
        return self.open is not None and adapter not in self.open

    def access_of(self, adapter: str) -> str:
        """ "protected" (keys of its own), "open" (deployment key or none) or "pending": a keys
        file is configured but does not name the adapter yet, so every request would get 401."""
        if adapter in self.digests:
            return "protected"
        if not self.loaded or (self.open is not None and adapter not in self.open):
            return "pending"
        return "open"

    def adapters_opened_by(self, token: str) -> frozenset[str]:
        """Every adapter whose keys include `token` (each digest compared in constant time)."""
        if not token or not self.salt:
            return frozenset()
        digest = digest_key(self.salt, token)
        return frozenset(
            name
            for name, values in self.digests.items()
            if _any_equal(digest, values)  # no early exit inside one adapter's set
        )


def _any_equal(digest: str, values: Iterable[str]) -> bool:
    found = False
    for value in values:
        found |= hmac.compare_digest(digest, value)
    return found


@dataclass(frozen=True)
class Caller:
    """What the request's Bearer token proves: the deployment key, some adapters' keys, or nothing."""

    has_token: bool = False
    is_deployment: bool = False
    adapters: frozenset[str] = frozenset()

    @property
    def is_known(self) -> bool:
        return self.is_deployment or bool(self.adapters)


class AccessControl:
    """The live rules of one app: the deployment key (fixed) and the access table (reloaded)."""

    def __init__(self, api_key: str | None, table: AccessTable | None = None) -> None:
        self.api_key = api_key
        self.table = table or AccessTable()
        self.declared_open: set[str] = set()  # loads that said `open`; the file's entry wins

    def declare_open(self, adapter: str, is_open: bool) -> None:
        (self.declared_open.add if is_open else self.declared_open.discard)(adapter)

    def _declared(self, adapter: str) -> bool:
        return self.table.loaded and adapter in self.declared_open and adapter not in self.table.digests

    def is_protected(self, adapter: str) -> bool:
        return not self._declared(adapter) and self.table.is_protected(adapter)

    def access_of(self, adapter: str) -> str:
        return "open" if self._declared(adapter) else self.table.access_of(adapter)

    def identify(self, header: str | None) -> Caller:
        scheme, _, token = (header or "").partition(" ")
        token = token.strip() if scheme.lower() == "bearer" else ""
        if not token:
            return Caller()
        deployment = bool(self.api_key) and is_authorized(header, self.api_key or "")
        return Caller(True, deployment, self.table.adapters_opened_by(token))

    def may_use(self, caller: Caller, adapter: str | None) -> bool:
        """`adapter` None is the base model."""
        if adapter is not None and self.is_protected(adapter):
            return adapter in caller.adapters
        return not self.api_key or caller.is_deployment

    def check(self, caller: Caller, adapter: str | None) -> None:
        """Raise 401 (no usable credential) or 403 (a credential, for something else)."""
        if self.may_use(caller, adapter):
            return
        what = f"adapter {adapter!r}" if adapter is not None else "the base model"
        if caller.is_known:
            raise ApiError(403, f"this key does not grant access to {what}", "forbidden")
        raise _unauthorized(f"missing or invalid API key for {what}")


def _unauthorized(message: str) -> ApiError:
    return ApiError(401, message, "authentication", headers={"WWW-Authenticate": "Bearer"})


_CALLER_KEY = web.RequestKey("loraplex_caller", Caller)


def caller_of(request: web.Request) -> Caller:
    return request.get(_CALLER_KEY) or Caller()


def auth_middleware(access: AccessControl) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """Identify the caller once; refuse unknown callers when a deployment key is set (401) and
    admin routes to anyone but the deployment key. Per-adapter checks happen in the routes,
    which know the adapter (`AccessControl.check`)."""

    @web.middleware
    async def check_api_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        caller = access.identify(request.headers.get("Authorization"))
        request[_CALLER_KEY] = caller
        if access.api_key and not caller.is_known:
            raise _unauthorized("missing or invalid API key")
        if _is_admin(request.path) and access.api_key and not caller.is_deployment:
            raise ApiError(403, "adapter administration needs the deployment key", "forbidden")
        return await handler(request)

    return check_api_key


def _is_admin(path: str) -> bool:
    return path in ADMIN_PATHS or path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/")


class AccessKeysWatcher:
    """Re-reads the mounted keys file; like the adapters file it compares content, because
    Kubernetes updates a Secret mount by swapping a symlink. A bad or missing file keeps the
    last good table (or, before the first, every adapter protected)."""

    def __init__(self, path: Path, access: AccessControl, poll_s: float = 5.0) -> None:
        self.path = path
        self.access = access
        self.poll_s = poll_s
        self._text: str | None = None

    def check(self) -> bool:
        """Apply the file if its content changed; True when it did."""
        try:
            text = self.path.read_text()
        except OSError:
            if self._text is None:
                self.access.table = AccessTable(loaded=False)
            log.warning("adapter keys file unreadable", extra={"path": str(self.path)})
            return False
        if text == self._text:
            return False
        self._text = text
        try:
            table = AccessTable.from_json(text)
        except (ValueError, KeyError, AttributeError, TypeError):
            # No parser message: it could quote file content.
            log.error("adapter keys file invalid, ignored", extra={"path": str(self.path)})
            return False
        self.access.table = table
        log.info("adapter keys file applied", extra={"protected_adapters": sorted(table.digests)})
        return True

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await asyncio.to_thread(self.check)
            except Exception:  # a watcher bug must not stop serving
                log.exception("adapter keys file check failed")

    async def cleanup_ctx(self, _: Any) -> AsyncIterator[None]:
        """An aiohttp `cleanup_ctx` entry: read once before serving, then watch."""
        self.check()
        task = asyncio.create_task(self.run())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
