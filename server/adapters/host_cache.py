"""Host-memory tier: which registered adapters keep their parsed weights in RAM (LRU).

Pure policy over registry entries, driven from the engine thread. An entry leaves the tier by
having its `weights` dropped (set to None); it stays registered and is read back from the
disk cache the next time a request needs it. `pinned` entries are held on top of the budget
and never dropped; an entry with requests in flight is not dropped either, so the tier may run
over budget until they finish (`trim`) rather than fail a request.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from loraplex.server.adapters.registry import AdapterEntry


@dataclass(frozen=True)
class HostCacheLimits:
    max_count: int = 64  # adapters kept parsed in host memory
    max_bytes: int | None = None  # and their total size, when set

    def __post_init__(self) -> None:
        if self.max_count < 1 or (self.max_bytes is not None and self.max_bytes < 1):
            raise ValueError("max_cpu_loras and max_cpu_lora_bytes must be >= 1")


class HostCache:
    def __init__(self, limits: HostCacheLimits) -> None:
        self.limits = limits
        self._entries: OrderedDict[str, AdapterEntry] = OrderedDict()  # least recently used first
        self.num_bytes = 0  # all resident weights, pinned included
        self._budget_count = 0  # unpinned entries and their bytes: what the limits apply to
        self._budget_bytes = 0
        self.num_evictions = 0
        self.num_disk_reads = 0  # weights read back after an eviction

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, entry: AdapterEntry) -> list[AdapterEntry]:
        """`entry` (weights set) is now resident and most recent; returns the entries dropped for it."""
        if entry.weights is None:
            raise ValueError(f"{entry.name!r}: no weights to keep")
        self.discard(entry.name)
        self._entries[entry.name] = entry
        self._account(entry, +1)
        return self._shrink(keep=entry.name)

    def trim(self) -> list[AdapterEntry]:
        """Back under budget once requests that held entries in memory have finished."""
        return self._shrink(keep=None) if self._over_budget() else []

    def touch(self, name: str) -> None:
        if name in self._entries:
            self._entries.move_to_end(name)

    def discard(self, name: str) -> None:
        """Forget `name` (unloaded or replaced); a retired version keeps its weights while used."""
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._account(entry, -1)

    def _account(self, entry: AdapterEntry, sign: int) -> None:
        size = _bytes(entry)
        self.num_bytes += sign * size
        if not entry.pinned:
            self._budget_count += sign
            self._budget_bytes += sign * size

    def _over_budget(self) -> bool:
        limits = self.limits
        return self._budget_count > limits.max_count or (
            limits.max_bytes is not None and self._budget_bytes > limits.max_bytes
        )

    def _shrink(self, keep: str | None) -> list[AdapterEntry]:
        dropped = []
        for name, entry in list(self._entries.items()):
            if not self._over_budget():
                break
            if name == keep or entry.pinned or entry.num_requests > 0:
                continue
            self.discard(name)
            entry.weights = None
            dropped.append(entry)
        self.num_evictions += len(dropped)
        return dropped


def _bytes(entry: AdapterEntry) -> int:
    return entry.weights.num_bytes if entry.weights is not None else 0
