"""The engine as the HTTP layer sees it: a Protocol, so `app` depends on a shape, not a class.

`loraplex.server.async_engine.AsyncEngine` implements it. Errors cross this boundary as the
typed exceptions below; the HTTP layer maps them to status codes (404, 422, 429, ...).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from loraplex.server.request import GenerationRequest, TokenEvent


class EngineError(Exception):
    """Base of errors the HTTP layer turns into responses. `error_type` is stable, for clients."""

    error_type = "engine_error"


class UnknownAdapterError(EngineError):
    error_type = "adapter_not_found"  # -> 404; never fall back to the base model


class InvalidRequestError(EngineError):
    error_type = "validation"  # -> 422 (prompt too long, bad parameters)


class QueueFullError(EngineError):
    error_type = "overloaded"  # -> 429 with Retry-After

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class AdapterLoadError(EngineError):
    """A load was refused; `error_type` names why (validation, source, capacity, ...)."""

    error_type = "adapter_load_failed"

    def __init__(self, message: str, error_type: str = "adapter_load_failed") -> None:
        super().__init__(message)
        self.error_type = error_type


class ShuttingDownError(EngineError):
    error_type = "shutting_down"  # -> 503


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter as reported by `GET /v1/adapters` (DESIGN.md §4; the operator reads this).

    `state`: "loading", "ready" (servable: in a GPU slot or brought in on demand) or "failed".
    """

    name: str
    source: str
    state: str
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    size_bytes: int | None = None
    revision: str | None = None  # as requested (what the operator compares with the spec)
    sha256: str | None = None  # the pinned digest (verified), else the weights file's own, computed
    resolved_revision: str | None = None  # the hub commit the revision resolved to
    load_generation: int = 0
    loaded_at: float | None = None  # unix seconds
    error: str | None = None
    error_type: str | None = None
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    tier: str | None = None  # "gpu", "cpu" or "disk" once loaded
    requests_served: int = 0
    prompt_tokens: int = 0  # served through this process, for charge-back (filled by the HTTP layer)
    generated_tokens: int = 0


@dataclass(frozen=True)
class LoadAdapterSpec:
    """`POST /v1/load_lora_adapter` body in the engine's terms (vLLM's lora_name/lora_path + ours)."""

    name: str
    source: str
    revision: str | None = None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    token: str | None = field(default=None, repr=False, compare=False)  # hub/bearer token for this fetch only


@dataclass(frozen=True)
class EngineHealth:
    """What `/health` reports: `ok` is False, with the reason, when the engine cannot serve."""

    ok: bool
    reason: str | None = None


@dataclass(frozen=True)
class EngineStats:
    """Live numbers for /metrics and autoscaling (vLLM metric names in DESIGN.md §4)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    max_loras: int
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """What `loraplex.server.app` needs from the engine."""

    @property
    def model_name(self) -> str: ...  # the base model's served name

    @property
    def tokenizer(self) -> Any: ...  # a transformers tokenizer (chat template, encode/decode)

    @property
    def max_input_tokens(self) -> int: ...

    @property
    def max_total_tokens(self) -> int: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Validate and enqueue (raising EngineError subclasses before the first event), then
        stream events; the last one has `finish_reason` set. Closing the iterator early
        (client disconnect) cancels the request and frees its KV blocks."""
        ...

    async def abort(self, request_id: str) -> None: ...

    def list_adapters(self) -> list[AdapterInfo]: ...

    def get_adapter(self, name: str) -> AdapterInfo:  # raises UnknownAdapterError
        ...

    async def load_adapter(self, spec: LoadAdapterSpec) -> AdapterInfo:  # raises AdapterLoadError
        ...

    async def unload_adapter(self, name: str) -> None:  # raises UnknownAdapterError
        ...

    def stats(self) -> EngineStats: ...

    def health(self) -> EngineHealth: ...  # cheap: /health calls it on the event loop

    async def shutdown(self, timeout_s: float) -> None: ...
