"""Async client for a server pod's adapter admin API (DESIGN.md §4): list, load, unload, health.

The operator never imports server code: `AdapterReport` is its own reading of the JSON the pods
send. Failures are typed so the daemon can tell a pod that is down from one that is busy from an
adapter the engine refused (whose error text goes into status verbatim).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any

import aiohttp
from pydantic import BaseModel, ConfigDict, ValidationError

from loraplex.operator.desired import DesiredAdapter


class EngineClientError(Exception):
    """Base of the errors below."""


class PodUnreachable(EngineClientError):
    """No usable answer: connection refused or reset, timeout, or a body that is not the API's."""


class EngineBusy(EngineClientError):
    """The pod is overloaded or draining (429/503): try again later, nothing is wrong."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class EngineHTTPError(EngineClientError):
    """An error response `{"error": ..., "error_type": ...}` (or a bare status) from the server."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(f"{status} {error_type}: {message}")
        self.status = status
        self.error_type = error_type
        self.message = message


class AdapterRejected(EngineHTTPError):
    """The engine refused to load or unload the adapter; `message` is its own explanation."""


class AdapterState(StrEnum):
    """An adapter's state on one pod, as `GET /v1/adapters` says it (the engine's vocabulary)."""

    LOADING = "loading"  # downloading, loading, or loaded but not callable yet (access pending)
    READY = "ready"
    FAILED = "failed"


class AdapterReport(BaseModel):
    """One entry of `GET /v1/adapters`: what a pod says about one adapter."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    source: str = ""
    state: AdapterState
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    size_bytes: int | None = None
    revision: str | None = None
    sha256: str | None = None
    resolved_revision: str | None = None  # the hub commit a revision resolved to
    load_generation: int = 0
    loaded_at: float | None = None  # unix seconds
    error: str | None = None
    error_type: str | None = None
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    tier: str | None = None
    requests_served: int = 0
    prompt_tokens: int = 0  # since the pod started: the operator sums them into status.tokens
    generated_tokens: int = 0
    # "open", "protected", or "pending": loaded but not in the pod's mounted keys file yet, which
    # the server reports as state "loading" (clients would get 401 until the mount refreshes)
    access: str | None = None


class _AdapterList(BaseModel):
    model_config = ConfigDict(extra="ignore")

    data: list[AdapterReport]
    # since `?since=`: absent from a server that predates it (its answer is always the full list)
    instance: str | None = None
    revision: int | None = None
    full: bool = True
    removed: list[str] = []


FULL_LIST_EVERY_S = 30.0  # a pod's whole list at least this often, whatever its deltas said
FORGET_AFTER_S = 600.0  # a pod not listed for this long (gone): its copy is dropped


@dataclass
class _Listing:
    """The last whole view of one pod's adapters, kept up to date from its deltas."""

    instance: str
    revision: int
    reports: dict[str, AdapterReport]
    full_at: float  # monotonic time of the last whole list
    used_at: float

    def since(self) -> str:
        return f"{self.instance}:{self.revision}"


@dataclass(frozen=True)
class EngineTimeouts:
    """Seconds. Loads get their own, longer budget: they include the download."""

    connect_s: float = 3.0
    request_s: float = 15.0
    load_s: float = 600.0


def pod_url(ip: str, port: int) -> str:
    host = f"[{ip}]" if ":" in ip else ip  # IPv6 pod IPs
    return f"http://{host}:{port}"


class EngineClient:
    """One HTTP session for talking to the pods of one base model. Use as an async context manager."""

    def __init__(self, timeouts: EngineTimeouts | None = None, api_key: str | None = None) -> None:
        self.timeouts = timeouts or EngineTimeouts()
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._session: aiohttp.ClientSession | None = None
        self._listings: dict[str, _Listing] = {}  # pod url -> its adapters as last listed

    async def __aenter__(self) -> EngineClient:
        return self.open()

    def open(self) -> EngineClient:
        """Start the HTTP session (what `async with` does); pair with `close()`."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers, raise_for_status=False)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def health(self, url: str) -> bool:
        """True when the server answers /health with 200 (up, model loaded)."""
        status, _ = await self._request(
            "GET", f"{url}/health", None, self.timeouts.request_s, json_body=False
        )
        return status == 200

    async def list_adapters(self, url: str) -> list[AdapterReport]:
        """Every adapter the pod reports. After a first whole list, asks only for what changed
        since (`?since=`) and applies it to the copy kept of that pod: at 1000 adapters a pass
        then reads a few reports instead of 600 KB. The whole list again at least every
        FULL_LIST_EVERY_S, after any error, and whenever the pod says it cannot answer the delta
        (it restarted)."""
        now = time.monotonic()
        self._listings = {
            key: kept for key, kept in self._listings.items() if now - kept.used_at < FORGET_AFTER_S
        }
        kept = self._listings.pop(url, None)
        if kept is not None and now - kept.full_at >= FULL_LIST_EVERY_S:
            kept = None
        query = f"?since={kept.since()}" if kept is not None else ""
        status, body = await self._request("GET", f"{url}/v1/adapters{query}", None, self.timeouts.request_s)
        _raise_for_error(status, body, EngineHTTPError)
        try:
            answer = _AdapterList.model_validate(body)
        except ValidationError as error:
            raise PodUnreachable(f"{url}/v1/adapters: unexpected body: {error}") from error
        if answer.full or kept is None:
            reports = {report.name: report for report in answer.data}
            full_at = now
        else:
            removed = set(answer.removed)
            reports = {name: report for name, report in kept.reports.items() if name not in removed}
            reports.update((report.name, report) for report in answer.data)
            full_at = kept.full_at
        if answer.instance is not None and answer.revision is not None:
            self._listings[url] = _Listing(answer.instance, answer.revision, reports, full_at, now)
        return list(reports.values())

    async def load_adapter(self, url: str, adapter: DesiredAdapter) -> AdapterReport | None:
        """Load (or reload) one adapter; returns the pod's report of it when the server sends one."""
        payload = {
            "lora_name": adapter.name,
            "lora_path": adapter.source,
            "revision": adapter.revision,
            "sha256": adapter.sha256,
            "aliases": list(adapter.aliases),
            "pinned": adapter.pinned,
            "open": adapter.open,
        }
        status, body = await self._request(
            "POST", f"{url}/v1/load_lora_adapter", payload, self.timeouts.load_s
        )
        _raise_for_error(status, body, AdapterRejected)
        try:
            return AdapterReport.model_validate(body) if isinstance(body, dict) else None
        except ValidationError:
            return None  # a vLLM-style plain success message: the next list shows the state

    async def unload_adapter(self, url: str, name: str) -> bool:
        """Unload; False when the pod did not have it (already converged), True when it did."""
        status, body = await self._request(
            "POST", f"{url}/v1/unload_lora_adapter", {"lora_name": name}, self.timeouts.request_s
        )
        if status == 404:
            return False
        _raise_for_error(status, body, AdapterRejected)
        return True

    async def _request(
        self, method: str, url: str, payload: dict[str, Any] | None, total_s: float, *, json_body: bool = True
    ) -> tuple[int, Any]:
        if self._session is None:
            raise RuntimeError("EngineClient used outside `async with`")
        timeout = aiohttp.ClientTimeout(total=total_s, sock_connect=self.timeouts.connect_s)
        try:
            async with self._session.request(method, url, json=payload, timeout=timeout) as response:
                text = await response.text()
                retry_after = response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError) as error:
            raise PodUnreachable(f"{method} {url}: {type(error).__name__}: {error}") from error
        if response.status in (429, 503):
            raise EngineBusy(f"{method} {url}: {response.status} {text[:200]}", _seconds(retry_after))
        return response.status, _parse_json(text) if json_body else text


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare, and the caller has its own backoff


def _raise_for_error(status: int, body: Any, error_class: type[EngineHTTPError]) -> None:
    if status < 400:
        return
    if isinstance(body, dict):
        message = str(body.get("error") or body.get("message") or body)
        error_type = str(body.get("error_type") or body.get("type") or "unknown")
    else:
        message, error_type = str(body or "")[:500], "unknown"
    raise error_class(status, error_type, message)
