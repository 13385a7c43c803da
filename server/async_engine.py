"""AsyncEngine: the `Engine` Protocol (engine_api.py) over an LLMEngine run by one thread.

The engine thread owns the LLMEngine: it drains a command queue (new requests, aborts,
adapter installs) between steps, steps while there is work, and hands each event to the
asyncio loop of the request's consumer with `call_soon_threadsafe`. Adapter files are read
and validated in a worker thread, so a load never stalls decoding; only the registry update
and the slot copy happen on the engine thread, between steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.registry import AdapterEntry
from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.engine_api import (
    AdapterInfo,
    AdapterLoadError,
    EngineError,
    EngineStats,
    InvalidRequestError,
    LoadAdapterSpec,
    QueueFullError,
    ShuttingDownError,
    UnknownAdapterError,
)
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sequence import AdapterRef

log = logging.getLogger(__name__)
T = TypeVar("T")
# (spec, model hf_config, max rank) -> weights; runs in a worker thread. Issue 5's manager plugs in here.
AdapterLoader = Callable[[LoadAdapterSpec, Any, int], LoraWeights]


def load_local_adapter(spec: LoadAdapterSpec, model_config: Any, max_rank: int) -> LoraWeights:
    """Default loader: a local PEFT directory (`/dir` or `file:///dir`)."""
    from loraplex.server.adapters.peft_format import AdapterValidationError, load_peft_adapter

    path = Path(spec.source.removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise AdapterLoadError(f"adapter source {spec.source!r} is not a local directory", "source")
    try:
        return load_peft_adapter(path, spec.name, model_config, max_rank)
    except AdapterValidationError as exc:
        raise AdapterLoadError(f"adapter {spec.name!r}: {exc}", "validation") from exc
    except OSError as exc:
        raise AdapterLoadError(f"adapter {spec.name!r}: cannot read {path}: {exc}", "source") from exc


@dataclass
class _Stream:
    """Where a request's events go: a queue read on the consumer's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, adapter_loader: AdapterLoader = load_local_adapter) -> None:
        self._engine = engine
        self._config: EngineConfig = engine.config
        self._loader = adapter_loader
        self._commands: deque[Callable[[], None]] = deque()
        self._wakeup = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # guarded by _lock
        self._adapters: dict[str, AdapterInfo] = {}  # guarded by _lock
        self._lock = threading.Lock()
        self._stats = engine.stats()
        self._stopping = False
        self._accepting = True
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(
        cls, config: EngineConfig, adapter_loader: AdapterLoader = load_local_adapter
    ) -> AsyncEngine:
        """Build the model and load the startup adapters (a failed one is reported, not fatal)."""
        engine = LLMEngine.from_config(config)
        async_engine = cls(engine, adapter_loader)
        for spec in config.adapters:
            try:
                async_engine.load_adapter_sync(spec)
            except AdapterLoadError as exc:
                log.error("startup adapter %s failed: %s", spec.name, exc)
        return async_engine

    # -- Engine Protocol: properties ---------------------------------------------------------

    @property
    def model_name(self) -> str:
        return self._config.model_name

    @property
    def tokenizer(self) -> Any:
        return self._engine.tokenizer

    @property
    def max_input_tokens(self) -> int:
        return self._config.max_input_tokens

    @property
    def max_total_tokens(self) -> int:
        return self._config.max_total_tokens

    def stats(self) -> EngineStats:
        return self._stats

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        while True:
            with self._wakeup:
                while not self._commands and not engine.has_unfinished() and not self._stopping:
                    self._wakeup.wait()
                commands = list(self._commands)
                self._commands.clear()
                if self._stopping and not commands:
                    return
            for command in commands:
                try:
                    command()
                except Exception:  # a command reports its own errors; never let one kill the loop
                    log.exception("engine command failed")
            engine.apply_slot_updates()
            if engine.has_unfinished():
                try:
                    events = engine.step()
                except Exception as exc:  # a bad step must not hang every client
                    log.exception("engine step failed")
                    events = engine.abort_all(FinishReason.ERROR, f"engine step failed: {exc}")
                self._dispatch(events)
            self._stats = engine.stats()

    def _submit(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the engine thread between steps."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self._submit(command)
        return future

    def _dispatch(self, events: list[TokenEvent]) -> None:
        for event in events:
            with self._lock:
                stream = self._streams.get(event.request_id)
                if event.finish_reason is not None:
                    self._streams.pop(event.request_id, None)
            if stream is None:
                continue
            try:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
            except RuntimeError:  # the consumer's event loop is closed: nobody will read this
                if event.finish_reason is None:
                    self._engine.abort(event.request_id)
                    with self._lock:
                        self._streams.pop(event.request_id, None)

    # -- requests ----------------------------------------------------------------------------

    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent]:
        """Validate and enqueue now (raising EngineError), then stream the request's events."""
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if not self._accepting:
                raise ShuttingDownError("the server is shutting down")
            if len(self._streams) >= self._config.max_concurrent_requests:
                raise QueueFullError(
                    f"{len(self._streams)} requests in flight (max_concurrent_requests="
                    f"{self._config.max_concurrent_requests})"
                )
            if request.request_id in self._streams:
                raise InvalidRequestError(f"request id {request.request_id!r} is already in use")
            self._engine.validate(request)
            self._streams[request.request_id] = stream
        self._submit(lambda: self._add(request, stream))
        return self._events(request.request_id, stream)

    def _add(self, request: GenerationRequest, stream: _Stream) -> None:
        try:
            self._engine.add_request(request)
        except (EngineError, ValueError) as exc:  # e.g. the adapter was unloaded meanwhile
            with self._lock:
                self._streams.pop(request.request_id, None)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

    async def _events(self, request_id: str, stream: _Stream) -> AsyncIterator[TokenEvent]:
        finished = False
        try:
            while not finished:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            if not finished:  # the consumer went away: free the request's blocks now
                self._submit(lambda: self._abort_now(request_id))

    async def abort(self, request_id: str) -> None:
        self._submit(lambda: self._abort_now(request_id))

    def _abort_now(self, request_id: str) -> None:
        event = self._engine.abort(request_id)
        if event is not None:
            self._dispatch([event])

    # -- adapters ----------------------------------------------------------------------------

    def list_adapters(self) -> list[AdapterInfo]:
        with self._lock:
            infos = list(self._adapters.values())
        return [self._with_counters(info) for info in infos]

    def get_adapter(self, name: str) -> AdapterInfo:
        with self._lock:
            info = self._adapters.get(name) or next(
                (i for i in self._adapters.values() if name in i.aliases), None
            )
        if info is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return self._with_counters(info)

    def _with_counters(self, info: AdapterInfo) -> AdapterInfo:
        if info.state != "ready":
            return info
        try:
            entry = self._engine.registry.get(info.name)
        except KeyError:
            return info
        tier = "gpu" if self._engine.registry.slot_of(entry.ref) is not None else "cpu"
        return replace(info, requests_served=entry.requests_served, tier=tier)

    async def load_adapter(self, spec: LoadAdapterSpec) -> AdapterInfo:
        current = self._adapters.get(spec.name)
        if current is not None and current.state == "ready" and _same_source(current, spec):
            return current
        self._set_info(current or AdapterInfo(name=spec.name, source=spec.source, state="loading"))
        try:
            weights = await asyncio.to_thread(self._parse, spec)
            entry = await asyncio.wrap_future(self._call(lambda: self._install(spec, weights)))
        except AdapterLoadError as exc:
            self._record_failure(spec, current, exc)
            raise
        return self._set_info(_info_of(entry, spec))

    def load_adapter_sync(self, spec: LoadAdapterSpec) -> AdapterInfo:
        """`load_adapter` for callers without an event loop (startup)."""
        try:
            weights = self._parse(spec)
            entry = self._call(lambda: self._install(spec, weights)).result()
        except AdapterLoadError as exc:
            self._record_failure(spec, self._adapters.get(spec.name), exc)
            raise
        return self._set_info(_info_of(entry, spec))

    def _parse(self, spec: LoadAdapterSpec) -> LoraWeights:
        hf_config, max_rank = self._engine.runner.hf_config, self._engine.runner.max_lora_rank
        try:
            return self._loader(spec, hf_config, max_rank)
        except AdapterLoadError:
            raise
        except Exception as exc:
            raise AdapterLoadError(f"adapter {spec.name!r}: {exc}") from exc

    def _install(self, spec: LoadAdapterSpec, weights: LoraWeights) -> AdapterEntry:
        entry = AdapterEntry(
            ref=AdapterRef(spec.name, 0),
            weights=weights,
            source=spec.source,
            revision=spec.revision,
            sha256=spec.sha256,
            aliases=spec.aliases,
            pinned=spec.pinned,
        )
        try:
            return self._engine.add_adapter(entry)
        except ValueError as exc:
            raise AdapterLoadError(str(exc), "conflict") from exc

    def _record_failure(self, spec: LoadAdapterSpec, previous: AdapterInfo | None, exc: EngineError) -> None:
        if previous is not None and previous.state == "ready":
            return  # the version already loaded keeps serving
        failed = AdapterInfo(spec.name, spec.source, "failed", error=str(exc), error_type=exc.error_type)
        self._set_info(failed)

    def _set_info(self, info: AdapterInfo) -> AdapterInfo:
        with self._lock:
            self._adapters[info.name] = info
        return info

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name` at once; return once its requests in flight are done."""
        info = self.get_adapter(name)
        with self._lock:
            self._adapters.pop(info.name, None)
        if info.state != "ready":
            return
        try:
            entry = await asyncio.wrap_future(self._call(lambda: self._engine.remove_adapter(info.name)))
        except KeyError as exc:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded") from exc
        while await asyncio.wrap_future(self._call(lambda: self._engine.registry.num_in_flight(entry.ref))):
            await asyncio.sleep(0.01)

    # -- shutdown ----------------------------------------------------------------------------

    async def shutdown(self, timeout_s: float) -> None:
        """Stop accepting, let requests in flight finish for up to `timeout_s`, cancel the rest."""
        with self._lock:
            self._accepting = False
        deadline = time.monotonic() + timeout_s
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._submit(self._cancel_all)
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify()
        await asyncio.to_thread(self._thread.join)

    def _cancel_all(self) -> None:
        self._dispatch(self._engine.abort_all(FinishReason.CANCELLED))


def _same_source(info: AdapterInfo, spec: LoadAdapterSpec) -> bool:
    return (info.source, info.revision, info.sha256) == (spec.source, spec.revision, spec.sha256)


def _info_of(entry: AdapterEntry, spec: LoadAdapterSpec) -> AdapterInfo:
    weights = entry.weights
    return AdapterInfo(
        name=entry.name,
        source=entry.source,
        state="ready",
        rank=weights.rank,
        alpha=weights.alpha,
        target_modules=weights.target_modules,
        size_bytes=weights.num_bytes,
        revision=spec.revision,
        sha256=spec.sha256,
        load_generation=entry.ref.generation,
        loaded_at=entry.loaded_at,
        aliases=entry.aliases,
        pinned=entry.pinned,
        tier="cpu",
    )
