"""AdapterManager: load, reload, unload and list adapters over three tiers (DESIGN.md §5).

Tiers: GPU slots (the registry decides, the scheduler brings adapters in between steps),
host memory (`HostCache`, parsed `LoraWeights`), and the disk cache of `sources`. Fetching and
parsing run in worker threads; only registry and host-cache changes run on the engine thread
(through `call`), so the decode loop never waits on I/O and no two threads mutate them.

A request whose adapter was dropped from host memory is held back (not failed) while its
weights are read back from disk; it enters the engine in the same engine-thread command that
puts the weights back, and its in-flight count then keeps them resident until it finishes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, TypeVar

from loraplex.server.adapters.host_cache import HostCache, HostCacheLimits
from loraplex.server.adapters.loader import to_host_layout
from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.registry import AdapterEntry
from loraplex.server.app_priority import started_pool
from loraplex.server.engine_api import (
    AdapterInfo,
    AdapterLoadError,
    EngineError,
    LoadAdapterSpec,
    UnknownAdapterError,
)
from loraplex.server.sequence import AdapterRef

if TYPE_CHECKING:
    from loraplex.server.engine import LLMEngine

log = logging.getLogger(__name__)
T = TypeVar("T")
# (spec, model hf_config, max rank) -> weights; blocking, runs in a worker thread.
AdapterLoader = Callable[[LoadAdapterSpec, Any, int], LoraWeights]
EngineCall = Callable[[Callable[[], Any]], concurrent.futures.Future]


@dataclass
class _ReadBack:
    """Requests waiting for one adapter version to come back from disk."""

    waiters: list[tuple[str, Callable[[], None], Callable[[EngineError], None]]] = field(default_factory=list)


class AdapterManager:
    def __init__(
        self, engine: LLMEngine, call: EngineCall, loader: AdapterLoader, limits: HostCacheLimits
    ) -> None:
        self._engine = engine
        self._call = call  # run a function on the engine thread, between steps
        self._loader = loader
        self.host = HostCache(limits)
        self._infos: dict[str, AdapterInfo] = {}
        self._specs: dict[str, LoadAdapterSpec] = {}  # what each ready adapter was loaded from
        self._locks: dict[str, asyncio.Lock] = {}
        self._read_backs: dict[AdapterRef, _ReadBack] = {}  # engine thread only
        self._read_back_specs: dict[AdapterRef, LoadAdapterSpec] = {}  # each version's own copy
        self._tasks: set[asyncio.Future] = set()  # loads in progress (kept alive until done)
        self._workers = started_pool(4, "loraplex-adapter")  # lowered priority (app_priority.py)
        self.num_loads = 0
        self.num_load_failures = 0
        self.num_unloads = 0

    # -- list / status -----------------------------------------------------------------------

    def list(self) -> list[AdapterInfo]:
        return [self._live(info) for info in list(self._infos.values())]

    def get(self, name: str) -> AdapterInfo:
        infos = list(self._infos.values())
        info = self._infos.get(name) or next((i for i in infos if name in i.aliases), None)
        if info is None:
            raise UnknownAdapterError(f"adapter {name!r} is not loaded")
        return self._live(info)

    def _live(self, info: AdapterInfo) -> AdapterInfo:
        """Add what changes while serving: tier and requests served."""
        registry = self._engine.registry
        if info.state != "ready" or info.name not in registry:
            return info
        entry = registry.get(info.name)
        if entry.ref.generation != info.load_generation:
            return info
        tier = (
            "gpu"
            if registry.slot_of(entry.ref) is not None
            else "cpu"
            if entry.weights is not None
            else "disk"
        )
        return replace(info, requests_served=entry.requests_served, tier=tier)

    def counters(self) -> dict[str, int]:
        """Numbers for EngineStats.extra (exported by /metrics)."""
        return {
            "adapter_loads": self.num_loads,
            "adapter_load_failures": self.num_load_failures,
            "adapter_unloads": self.num_unloads,
            "adapter_host_evictions": self.host.num_evictions,
            "adapter_disk_reads": self.host.num_disk_reads,
            "adapter_host_bytes": self.host.num_bytes,
            "adapter_host_count": len(self.host),
        }

    # -- load / reload -----------------------------------------------------------------------

    async def load(self, spec: LoadAdapterSpec) -> AdapterInfo:
        """Load `spec`; the same source+revision+sha256 again is a no-op, another one a reload.

        The load runs as its own task: a caller that goes away (client hang-up, handler
        cancelled) does not stop it, so the adapter always ends `ready` or `failed`."""
        task = asyncio.ensure_future(self._load(spec))
        self._tasks.add(task)
        task.add_done_callback(_forget_task(self._tasks))
        return await asyncio.shield(task)

    async def _load(self, spec: LoadAdapterSpec) -> AdapterInfo:
        async with self._lock(spec.name):
            current = self._infos.get(spec.name)
            if (
                current is not None
                and current.state == "ready"
                and _same_source(self._specs.get(spec.name), spec)
            ):
                return self._live(current)
            if current is None or current.state != "ready":  # a ready version keeps serving meanwhile
                self._infos[spec.name] = AdapterInfo(name=spec.name, source=spec.source, state="loading")
            try:
                weights = await asyncio.get_running_loop().run_in_executor(self._workers, self._read, spec)
                entry = await asyncio.wrap_future(self._call(lambda: self._install(spec, weights)))
            except EngineError as exc:
                self._record_failure(spec, current, exc)
                raise
            except BaseException as exc:  # cancelled by shutdown, or a bug: never leave it `loading`
                self._record_failure(
                    spec, current, AdapterLoadError(f"adapter {spec.name!r}: load interrupted ({exc!r})")
                )
                raise
            return self._ready(entry, spec, weights)

    def load_sync(self, spec: LoadAdapterSpec) -> AdapterInfo:
        """`load` for callers without an event loop (engine start)."""
        current = self._infos.get(spec.name)
        try:
            weights = self._read(spec)
            entry = self._call(lambda: self._install(spec, weights)).result()
        except EngineError as exc:
            self._record_failure(spec, current, exc)
            raise
        except BaseException as exc:
            self._record_failure(
                spec, current, AdapterLoadError(f"adapter {spec.name!r}: load interrupted ({exc!r})")
            )
            raise
        return self._ready(entry, spec, weights)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    def _read(self, spec: LoadAdapterSpec) -> LoraWeights:
        """Worker thread: fetch, validate, parse, then lay the weights out for fast slot copies."""
        runner = self._engine.runner
        try:
            weights = self._loader(spec, runner.hf_config, runner.max_lora_rank)
            return to_host_layout(weights, runner.dtype, pin=runner.device.type == "cuda")
        except EngineError:
            raise
        except Exception as exc:  # a loader bug must become a failed load, never a dead server
            raise AdapterLoadError(f"adapter {spec.name!r}: {exc}") from exc

    def _install(self, spec: LoadAdapterSpec, weights: LoraWeights) -> AdapterEntry:
        """Engine thread: register the new version (retiring the old one) and keep it in RAM."""
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
            entry = self._engine.add_adapter(entry)
        except ValueError as exc:
            raise AdapterLoadError(str(exc), "conflict") from exc
        self.host.discard(spec.name)
        self._log_dropped(self.host.put(entry))
        return entry

    def _ready(self, entry: AdapterEntry, spec: LoadAdapterSpec, weights: LoraWeights) -> AdapterInfo:
        self.num_loads += 1
        self._specs[spec.name] = spec
        owned = weights.metadata.get("owned_dir")
        if owned:  # read-backs re-read the server's own copy, digest checked, never the user's files
            self._read_back_specs[entry.ref] = LoadAdapterSpec(
                spec.name, str(owned), sha256=str(weights.metadata["sha256"])
            )
        info = _info_of(entry, spec, weights)  # entry.weights may already be dropped again
        self._infos[spec.name] = info
        log.info("adapter loaded", extra={"adapter": spec.name, "generation": entry.ref.generation})
        return self._live(info)

    def _record_failure(self, spec: LoadAdapterSpec, previous: AdapterInfo | None, exc: EngineError) -> None:
        self.num_load_failures += 1
        log.warning(
            "adapter load failed",
            extra={"adapter": spec.name, "error_type": exc.error_type, "error": str(exc)},
        )
        if previous is not None and previous.state == "ready":
            self._infos[spec.name] = previous  # the version already loaded keeps serving
            return
        self._infos[spec.name] = AdapterInfo(
            spec.name, spec.source, "failed", error=str(exc), error_type=exc.error_type
        )

    # -- unload ------------------------------------------------------------------------------

    async def unload(self, name: str) -> None:
        """Refuse new requests for `name` at once; return once its requests in flight are done."""
        info = self.get(name)
        async with self._lock(info.name):
            info = self._infos.pop(info.name, info)
            self._specs.pop(info.name, None)
            if info.state != "ready":
                return
            try:
                entry = await asyncio.wrap_future(self._call(lambda: self._remove(info.name)))
            except KeyError as exc:
                raise UnknownAdapterError(f"adapter {name!r} is not loaded") from exc
            while await asyncio.wrap_future(
                self._call(lambda: self._engine.registry.num_in_flight(entry.ref))
            ):
                await asyncio.sleep(0.01)
            self.num_unloads += 1

    def _remove(self, name: str) -> AdapterEntry:
        entry = self._engine.remove_adapter(name)
        self.host.discard(entry.name)
        self._read_back_specs.pop(entry.ref, None)
        return entry

    # -- requests: bring weights back from disk ------------------------------------------------

    def admit(
        self, adapter: str | None, add: Callable[[], None], fail: Callable[[EngineError], None]
    ) -> None:
        """Engine thread: run `add` once the adapter's weights are in host memory (now, or after a read)."""
        registry = self._engine.registry
        if adapter is None or adapter not in registry:
            add()  # no adapter, or gone meanwhile: add_request raises the typed error
            return
        entry = registry.get(adapter)
        if entry.weights is not None:
            self.host.touch(entry.name)
            add()
            return
        pending = self._read_backs.get(entry.ref)
        if pending is None:
            pending = self._read_backs[entry.ref] = _ReadBack()
            future = self._workers.submit(self._read, self._spec_of(entry))
            future.add_done_callback(lambda f: self._call(lambda: self._read_back_done(entry, f)))
        pending.waiters.append((adapter, add, fail))

    def _spec_of(self, entry: AdapterEntry) -> LoadAdapterSpec:
        spec = self._read_back_specs.get(entry.ref) or self._specs.get(entry.name)
        return spec or LoadAdapterSpec(entry.name, entry.source, entry.revision, entry.sha256)

    def _read_back_done(self, entry: AdapterEntry, future: concurrent.futures.Future) -> None:
        """Engine thread: the weights are back (or not); admit the waiting requests now, in one go."""
        pending = self._read_backs.pop(entry.ref)
        error = future.exception()
        registry = self._engine.registry
        if error is None and entry.name in registry and registry.get(entry.name).ref == entry.ref:
            entry.weights = future.result()
            self.host.num_disk_reads += 1
            self._log_dropped(self.host.put(entry))
        for adapter, add, fail in pending.waiters:
            if error is None:
                self.admit(adapter, add, fail)  # resident now (or reloaded meanwhile: admit decides again)
            else:
                fail(error if isinstance(error, EngineError) else AdapterLoadError(str(error)))

    def trim(self) -> None:
        """Engine thread, after each step: requests that kept the host tier over budget may be done."""
        self._log_dropped(self.host.trim())

    def _log_dropped(self, dropped: list[AdapterEntry]) -> None:
        for entry in dropped:
            log.debug("adapter dropped from host memory", extra={"adapter": entry.name})

    def close(self) -> None:
        self._workers.shutdown(wait=False, cancel_futures=True)


def _same_source(loaded: LoadAdapterSpec | None, spec: LoadAdapterSpec) -> bool:
    if loaded is None:
        return False
    return (loaded.source, loaded.revision, loaded.sha256, loaded.aliases, loaded.pinned) == (
        spec.source,
        spec.revision,
        spec.sha256,
        spec.aliases,
        spec.pinned,
    )


def _info_of(entry: AdapterEntry, spec: LoadAdapterSpec, weights: LoraWeights) -> AdapterInfo:
    return AdapterInfo(
        name=entry.name,
        source=entry.source,
        state="ready",
        rank=weights.rank,
        alpha=weights.alpha,
        target_modules=weights.target_modules,
        size_bytes=weights.num_bytes,
        revision=spec.revision,
        # A pinned digest was verified (for https it is the archive's); else the one computed here.
        sha256=spec.sha256 or _str_or_none(weights.metadata.get("sha256")),
        resolved_revision=_str_or_none(weights.metadata.get("revision")) or spec.revision,
        load_generation=entry.ref.generation,
        loaded_at=entry.loaded_at,
        aliases=entry.aliases,
        pinned=entry.pinned,
        tier="cpu",
    )


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _forget_task(tasks: set[asyncio.Future]) -> Callable[[asyncio.Future], None]:
    def done(task: asyncio.Future) -> None:
        tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: a load nobody waits for any more is recorded, not logged twice

    return done
