"""Writes of one base, off the pass: statuses and adapters' finalizer patches, queued, coalesced
per object, the base's status first.

A pass never waits for a thousand PATCHes: it hands them here and goes on observing, so a dead
pod reaches the base's status within one pass even while adapters' statuses are still being
written. A newer status for an object replaces the one still queued (only the latest matters).

Order: the base's status; then statuses that take a Ready claim back (a pod died, restarted or
turned unready); then finalizer patches; then the rest. When a pod restarts while a thousand
adapters load again, the retractions are not queued behind the thousand new Ready claims.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from typing import Any

from loraplex.operator import lora as lora_crd
from loraplex.operator.k8s import Kube
from loraplex.operator.plan import MetaPatch, StatusPatch

log = logging.getLogger(__name__)
ObjectKey = tuple[str, str, str]  # (plural or "meta", namespace, name)
CONCURRENCY = 32  # PATCHes in flight at once
FIRST, RETRACT, META, REST = 0, 1, 2, 3  # queue priorities, in the order of the docstring


def ready_pods(status: dict[str, Any]) -> set[str]:
    """The pods a stored or planned LoraAdapter status calls Ready on."""
    return {i.get("pod", "") for i in status.get("instances") or () if i.get("state") == "Ready"}


def retracts(patch: StatusPatch) -> bool:
    """Whether the patch takes back a Ready claim of the stored status (fewer ready replicas, or a
    pod no longer Ready). Only such a write makes the stored status say less than it did."""
    old, new = patch.seen or {}, patch.status
    if new.get("readyReplicas", 0) < old.get("readyReplicas", 0):
        return True
    return "instances" in new and not ready_pods(old) <= ready_pods(new)


REPORT_AT = 100  # a run of this many writes or more is logged with its pace when it ends


class StatusWriter:
    def __init__(self, kube: Kube, concurrency: int = CONCURRENCY) -> None:
        self._kube = kube
        self._concurrency = concurrency
        self._queue: asyncio.PriorityQueue[tuple[int, int, ObjectKey]] = asyncio.PriorityQueue()
        self._order = itertools.count()
        self.pending: dict[ObjectKey, StatusPatch | MetaPatch] = {}
        # what we last wrote or are writing now, and over which stored status (the watch
        # delivers it later): a pass that plans the same again while it is in flight skips it
        self.written: dict[ObjectKey, tuple[Any, Any]] = {}
        self.in_flight: set[ObjectKey] = set()
        self._queued: dict[ObjectKey, int] = {}  # pending key -> the best priority it is queued at
        self._workers: list[asyncio.Task[None]] = []
        self._run_started = 0.0  # when the writer last went from idle to busy
        self._run_writes = 0

    def submit(self, patch: StatusPatch, first: bool = False) -> None:
        key = (patch.plural, patch.namespace, patch.name)
        if self.written.get(key) == (patch.seen or {}, patch.status):
            self.pending.pop(key, None)
            self._queued.pop(key, None)
            return  # already written over this same stored status
        priority = FIRST if first else RETRACT if retracts(patch) else REST
        queued = self._queued.get(key)
        if queued is None or priority < queued:  # a later, earlier-ranked entry: the old one is skipped
            self._queued[key] = priority
            self._queue.put_nowait((priority, next(self._order), key))
        self.pending[key] = patch
        self._start()

    def submit_meta(self, patch: MetaPatch) -> None:
        """Finalizers before statuses: an adapter's attachment is recorded before it is reported."""
        key = ("meta", patch.namespace, patch.name)
        if self.written.get(key) == (patch.observed, patch.finalizers):
            return  # written, the watch has not shown it yet
        if key not in self.pending:
            self._queued[key] = META
            self._queue.put_nowait((META, next(self._order), key))
        self.pending[key] = patch
        self._start()

    def _start(self) -> None:
        if not self._workers:
            self._workers = [asyncio.create_task(self._work()) for _ in range(self._concurrency)]

    def latest(self, key: ObjectKey, stored: dict[str, Any]) -> dict[str, Any] | None:
        """The status we are writing or wrote over `stored`, while the watch still shows `stored`."""
        if isinstance(patch := self.pending.get(key), StatusPatch):
            return patch.status
        written = self.written.get(key)
        return written[1] if written is not None and written[0] == stored else None

    def forget_except(self, names: set[tuple[str, str]], plural: str) -> None:
        """Drop what was written to `plural` objects (and their metadata) no longer present."""
        for key in [key for key in self.written if key[0] in (plural, "meta") and key[1:] not in names]:
            del self.written[key]

    async def idle(self) -> None:
        """Until everything queued is written (tests, shutdown)."""
        while self.pending or self.in_flight:
            await asyncio.sleep(0.01)

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    async def _work(self) -> None:
        while True:
            _, _, key = await self._queue.get()
            patch = self.pending.pop(key, None)
            if patch is None:
                continue  # written already by an earlier entry of the same object
            self._queued.pop(key, None)
            if not self.in_flight and not self._run_writes:
                self._run_started = time.monotonic()
            self.in_flight.add(key)
            try:
                await self._write(key, patch)
            except Exception:  # gone (404), changed (409, 422) or failed: the next pass decides
                self.written.pop(key, None)
            finally:
                self.in_flight.discard(key)
                self._run_writes += 1
                if not self.in_flight and not self.pending:
                    self._report_run()

    def _report_run(self) -> None:
        took, writes = time.monotonic() - self._run_started, self._run_writes
        self._run_writes = 0
        if writes >= REPORT_AT:
            log.info("writer: %d PATCHes in %.2fs (%.0f/s)", writes, took, writes / max(took, 1e-6))

    async def _write(self, key: ObjectKey, patch: StatusPatch | MetaPatch) -> None:
        """Recorded as written before the call returns (a failure forgets it again)."""
        if isinstance(patch, MetaPatch):
            self.written[key] = (patch.observed, patch.finalizers)
            await self._kube.patch_metadata(lora_crd.PLURAL, patch.namespace, patch.name, patch.json_patch())
        else:
            self.written[key] = (patch.seen or {}, patch.status)
            await self._kube.patch_status(patch.plural, patch.namespace, patch.name, patch.status)
