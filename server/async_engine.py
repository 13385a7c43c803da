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
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Any, TypeVar

import torch

from loraplex.server.adapters.loader import LoaderConfig, SourceLoader
from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.manager import AdapterLoader, AdapterManager
from loraplex.server.app_priority import lower_thread_priority
from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.engine_api import (
    AdapterInfo,
    EngineError,
    EngineHealth,
    EngineStats,
    InvalidRequestError,
    LoadAdapterSpec,
    QueueFullError,
    ShuttingDownError,
)
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.scheduler import ScheduledStep
from loraplex.server.text_fanout import FanOut, StepOutput

log = logging.getLogger(__name__)
T = TypeVar("T")
UNHEALTHY_AFTER_FAILED_STEPS = 8  # /health fails once this many steps in a row ran no request
SHUTDOWN_ERROR = "the server shut down before the request finished"
__all__ = ["AdapterLoader", "AsyncEngine", "load_local_adapter"]


def load_local_adapter(spec: LoadAdapterSpec, model_config: Any, max_rank: int) -> LoraWeights:
    """A loader with default settings (any source, no base-model check), for tools and tests."""
    return SourceLoader(LoaderConfig())(spec, model_config, max_rank)


@dataclass
class _Stream:
    """Where a request's events go: a queue read on the consumer's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[TokenEvent | BaseException]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, adapter_loader: AdapterLoader | None = None) -> None:
        self._engine = engine
        engine.defer_text = True  # detokenised by the fan-out thread, after the engine moved on
        self._fanout = FanOut(self._deliver)
        self._config: EngineConfig = engine.config
        self._commands: deque[Callable[[], None]] = deque()
        self._wakeup = threading.Condition()
        self._streams: dict[str, _Stream] = {}  # guarded by _lock
        self._lock = threading.Lock()
        loader = adapter_loader or SourceLoader(self._config.adapter_loader_config())
        self.adapters = AdapterManager(engine, self._call, loader, self._config.host_cache_limits())
        self._stats = engine.stats()
        self._stopping = False
        self._accepting = True
        self._failed_steps = 0  # steps in a row in which no request could run
        self._died: str | None = None
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, adapter_loader: AdapterLoader | None = None) -> AsyncEngine:
        """Build the model and load the startup adapters (a failed one is reported, not fatal)."""
        engine = LLMEngine.from_config(config)
        async_engine = cls(engine, adapter_loader)
        for spec in config.adapters:
            try:
                async_engine.load_adapter_sync(spec)
            except EngineError as exc:
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

    def observe_steps(self, observer: Callable[[ScheduledStep], None]) -> None:
        """Call `observer` with every step's plan, on the engine thread (benchmarks, tests)."""
        self._call(lambda: self._engine.step_observers.append(observer)).result()

    # -- the engine thread -------------------------------------------------------------------

    def _run(self) -> None:
        lower_thread_priority()  # the event loop gets the CPU first (server/app_priority.py)
        try:
            # Nothing on this thread needs autograd: in inference mode for good, a step does not
            # enter and leave it (tens of microseconds once a forward pass has cooled the caches).
            with torch.inference_mode():
                self._loop()
        except BaseException as exc:  # the loop itself broke: say so on /health, end every stream
            log.exception("engine thread died")
            self._died = f"the engine thread died: {exc!r}"
            self._fail_all_streams(self._died)

    def _loop(self) -> None:
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
                self._dispatch(self._step())
            self.adapters.trim()
            self._stats = self._with_adapter_counters(engine.stats())

    def _step(self) -> list[StepOutput]:
        """One engine step. The engine isolates failures it can attribute to a request; anything
        else (a bug in the step's bookkeeping) ends the requests in flight rather than hang them.
        A steady decode step's events come as one `TokenBatch`, expanded on the fan-out thread."""
        engine = self._engine
        try:
            events = engine.step_outputs()
        except Exception as exc:
            log.exception("engine step failed")
            self._failed_steps += 1
            return engine.abort_all(FinishReason.ERROR, f"engine step failed: {exc}")
        self._failed_steps = engine.num_failed_steps_in_a_row
        return events

    def health(self) -> EngineHealth:
        """Unhealthy when the engine thread is gone or the last `UNHEALTHY_AFTER_FAILED_STEPS`
        steps all failed; a liveness probe on /health then restarts the pod."""
        if self._died is not None:
            return EngineHealth(False, self._died)
        if not self._thread.is_alive() and not self._stopping:
            return EngineHealth(False, "the engine thread is not running")
        if self._failed_steps >= UNHEALTHY_AFTER_FAILED_STEPS:
            return EngineHealth(False, f"the last {self._failed_steps} engine steps all failed")
        return EngineHealth(True)

    def _fail_all_streams(self, error: str) -> None:
        with self._lock:
            streams = list(self._streams.items())
            self._streams.clear()
        for request_id, stream in streams:
            event = TokenEvent(request_id, None, "", finish_reason=FinishReason.ERROR, error=error)
            with contextlib.suppress(RuntimeError):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)

    def _with_adapter_counters(self, stats: EngineStats) -> EngineStats:
        return replace(stats, extra=stats.extra | self.adapters.counters())

    def _submit(self, command: Callable[[], None]) -> None:
        with self._wakeup:
            self._commands.append(command)
            self._wakeup.notify()

    def _call(self, fn: Callable[[], T]) -> concurrent.futures.Future[T]:
        """Run `fn` on the engine thread between steps.

        The future resolves on the fan-out thread, after the events of the steps before it were
        delivered: a caller that awaits it sees the streams as the engine left them.
        """
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def command() -> None:
            try:
                result = fn()
            except BaseException as exc:
                self._fanout.call(lambda error=exc: future.set_exception(error))
            else:
                self._fanout.call(lambda: future.set_result(result))

        self._submit(command)
        return future

    def _dispatch(self, events: list[StepOutput]) -> None:
        """Engine thread: hand the events (and their text still to make) to the fan-out thread."""
        self._fanout.submit(events, self._engine.take_text_jobs())

    def _deliver(self, event: TokenEvent) -> None:
        """Fan-out thread: one event to its consumer's loop."""
        with self._lock:
            stream = self._streams.get(event.request_id)
            if event.finish_reason is not None:
                self._streams.pop(event.request_id, None)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, event)
        except RuntimeError:  # the consumer's event loop is closed: nobody will read this
            if event.finish_reason is None:
                with self._lock:
                    self._streams.pop(event.request_id, None)
                self._submit(lambda: self._engine.abort(event.request_id))

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
        """Engine thread: enqueue, once the adapter's weights are in host memory."""

        def fail(exc: BaseException) -> None:
            with self._lock:
                self._streams.pop(request.request_id, None)
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)

        def add() -> None:
            with self._lock:
                if request.request_id not in self._streams:
                    return  # aborted while its adapter was read back from disk
            try:
                self._engine.add_request(request)
            except (EngineError, ValueError) as exc:  # e.g. the adapter was unloaded meanwhile
                fail(exc)

        self.adapters.admit(request.adapter, add, fail)

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
        if event is None and request_id in self._streams:  # still waiting for its adapter's weights
            event = TokenEvent(request_id, None, "", finish_reason=FinishReason.CANCELLED)
        if event is not None:
            self._dispatch([event])

    # -- adapters (AdapterManager) -----------------------------------------------------------

    def list_adapters(self) -> list[AdapterInfo]:
        return self.adapters.list()

    def get_adapter(self, name: str) -> AdapterInfo:
        return self.adapters.get(name)

    async def load_adapter(self, spec: LoadAdapterSpec) -> AdapterInfo:
        return await self.adapters.load(spec)

    def load_adapter_sync(self, spec: LoadAdapterSpec) -> AdapterInfo:
        """`load_adapter` for callers without an event loop (startup)."""
        return self.adapters.load_sync(spec)

    async def unload_adapter(self, name: str) -> None:
        """Refuse new requests for `name` at once; return once its requests in flight are done."""
        await self.adapters.unload(name)

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
        await asyncio.to_thread(self._fanout.close)
        self.adapters.close()

    def _cancel_all(self) -> None:
        """Engine thread, at the drain deadline: every request still running gets a final event
        (`error_type: "shutdown"`) its route writes as an error, instead of a cut connection."""
        events = self._engine.abort_all(FinishReason.CANCELLED, SHUTDOWN_ERROR)
        with self._lock:
            in_engine = {event.request_id for event in events}
            # Not in the engine yet (their adapter was being read back from disk).
            waiting = [request_id for request_id in self._streams if request_id not in in_engine]
        events += [
            TokenEvent(r, None, "", finish_reason=FinishReason.CANCELLED, error=SHUTDOWN_ERROR)
            for r in waiting
        ]
        self._dispatch([replace(event, error_type="shutdown") for event in events])
