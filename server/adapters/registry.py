"""Which adapters exist, which version of each is current, and which one sits in each GPU slot.

Pure bookkeeping: it never touches a device. The engine drains `take_slot_updates()` between
steps and copies weights into the model runner's slot buffers, so a load, an eviction or an
unload can never change a slot that a running sequence reads (a slot with users is never
reassigned). Every (re)load gets a fresh `generation`; sequences keep the `AdapterRef` they
started with, so a reload never swaps weights under a request in flight and never reuses
K/V cached for the old weights. The manager of issue 5 (tiers, sources) plugs in above this:
it decides *what* is registered and keeps `weights` in host memory (None while the host
cache has dropped them: they are read back from disk before a request of that version enters).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from loraplex.server.sequence import AdapterRef

if TYPE_CHECKING:
    from loraplex.server.adapters.lora_weights import LoraWeights


@dataclass
class AdapterEntry:
    """One loaded version of an adapter."""

    ref: AdapterRef
    weights: LoraWeights | None  # None: not in host memory (disk tier)
    source: str
    revision: str | None = None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    loaded_at: float = field(default_factory=time.time)
    requests_served: int = 0
    num_requests: int = 0  # in flight (waiting or running): keeps a retired version alive

    @property
    def name(self) -> str:
        return self.ref.name


@dataclass
class _Slot:
    ref: AdapterRef | None = None
    num_users: int = 0  # running sequences reading this slot
    last_used: int = 0  # LRU tick among idle slots


@dataclass(frozen=True)
class SlotUpdate:
    """What the engine must do to a runner slot before the next step (weights None = clear)."""

    slot: int
    weights: LoraWeights | None


class AdapterRegistry:
    def __init__(self, max_loras: int) -> None:
        if max_loras < 0:
            raise ValueError("max_loras must be >= 0")
        self.max_loras = max_loras
        self._current: dict[str, AdapterEntry] = {}  # served name -> current version
        self._aliases: dict[str, str] = {}
        self._versions: dict[AdapterRef, AdapterEntry] = {}  # current and retired, alive
        self._slots = [_Slot() for _ in range(max_loras)]
        self._pending: dict[int, LoraWeights | None] = {}
        self._generations = itertools.count(1)
        self._ticks = itertools.count(1)
        self.num_slot_loads = 0  # copies into a slot
        self.num_slot_evictions = 0  # an idle adapter pushed out of its slot for another

    # -- catalogue ---------------------------------------------------------------------------

    def add(self, entry: AdapterEntry) -> AdapterEntry:
        """Register `entry` under its name with a new generation, retiring any previous version."""
        name = entry.ref.name
        if name in self._aliases and self._aliases[name] != name:
            raise ValueError(f"{name!r} is already an alias of adapter {self._aliases[name]!r}")
        for alias in entry.aliases:
            owner = self._aliases.get(alias)
            if owner not in (None, name):
                raise ValueError(f"alias {alias!r} already belongs to adapter {owner!r}")
        if name in self._current:
            self.remove(name)
        entry = replace(entry, ref=AdapterRef(name, next(self._generations)), num_requests=0)
        self._current[name] = entry
        self._versions[entry.ref] = entry
        for alias in (name, *entry.aliases):
            self._aliases[alias] = name
        return entry

    def remove(self, name: str) -> AdapterEntry:
        """Stop serving `name` for new requests; the version lives on while requests use it."""
        entry = self._current.pop(self.canonical_name(name))
        for alias in (entry.name, *entry.aliases):
            self._aliases.pop(alias, None)
        self._drop_if_unused(entry)
        return entry

    def canonical_name(self, name: str) -> str:
        if name not in self._aliases:
            raise KeyError(name)
        return self._aliases[name]

    def get(self, name: str) -> AdapterEntry:
        """The current version of `name` (a served name or alias); KeyError if unknown."""
        return self._current[self.canonical_name(name)]

    def __contains__(self, name: object) -> bool:
        return name in self._aliases

    def entries(self) -> list[AdapterEntry]:
        return list(self._current.values())

    def version(self, ref: AdapterRef) -> AdapterEntry:
        return self._versions[ref]

    def num_in_flight(self, ref: AdapterRef) -> int:
        entry = self._versions.get(ref)
        return entry.num_requests if entry else 0

    # -- requests ----------------------------------------------------------------------------

    def retain(self, name: str) -> AdapterRef:
        """A request for `name` enters the engine: pin the current version until it leaves."""
        entry = self.get(name)
        entry.num_requests += 1
        entry.requests_served += 1
        return entry.ref

    def release(self, ref: AdapterRef) -> None:
        entry = self._versions[ref]
        entry.num_requests -= 1
        self._drop_if_unused(entry)

    def _drop_if_unused(self, entry: AdapterEntry) -> None:
        if entry.num_requests > 0 or self._current.get(entry.name) is entry:
            return
        del self._versions[entry.ref]
        slot = self.slot_of(entry.ref)
        if slot is not None:
            self._slots[slot] = _Slot()
            self._pending[slot] = None

    # -- GPU slots ---------------------------------------------------------------------------

    def slot_of(self, ref: AdapterRef) -> int | None:
        for index, slot in enumerate(self._slots):
            if slot.ref == ref:
                return index
        return None

    def _free_slot(self) -> int | None:
        """An empty slot, else the least recently used idle one that is not pinned."""
        idle = []
        for index, slot in enumerate(self._slots):
            if slot.ref is None:
                return index
            if slot.num_users == 0 and not self._versions[slot.ref].pinned:
                idle.append((slot.last_used, index))
        return min(idle)[1] if idle else None

    def can_acquire_slot(self, ref: AdapterRef) -> bool:
        return self.slot_of(ref) is not None or self._free_slot() is not None

    def acquire_slot(self, ref: AdapterRef) -> int:
        """A sequence of `ref` starts running: the slot holding it (bringing it in if needed)."""
        index = self.slot_of(ref)
        if index is None:
            index = self._free_slot()
            if index is None:
                raise RuntimeError(f"no adapter slot free for {ref.name!r} (check can_acquire_slot)")
            weights = self._versions[ref].weights
            if weights is None:
                raise RuntimeError(f"{ref.name!r} is not in host memory (the manager reads it back first)")
            self.num_slot_evictions += self._slots[index].ref is not None
            self.num_slot_loads += 1
            self._slots[index] = _Slot(ref=ref)
            self._pending[index] = weights
        self._slots[index].num_users += 1
        return index

    def release_slot(self, ref: AdapterRef) -> None:
        index = self.slot_of(ref)
        if index is None:
            raise RuntimeError(f"{ref.name!r} holds no slot")
        slot = self._slots[index]
        slot.num_users -= 1
        slot.last_used = next(self._ticks)

    def in_slot(self, name: str) -> bool:
        """Whether the current version of `name` sits in a GPU slot."""
        return self.slot_of(self.get(name).ref) is not None

    def slot_users(self) -> dict[AdapterRef, int]:
        """Resident, evictable (unpinned) adapter versions and how many running sequences read each."""
        return {
            s.ref: s.num_users for s in self._slots if s.ref is not None and not self._versions[s.ref].pinned
        }

    @property
    def has_slot_updates(self) -> bool:
        """Whether `take_slot_updates` has anything to hand out (a cheap check, once per step)."""
        return bool(self._pending)

    def take_slot_updates(self) -> list[SlotUpdate]:
        """Slot copies/clears decided since the last call, for the engine to apply."""
        updates = [SlotUpdate(slot, weights) for slot, weights in sorted(self._pending.items())]
        self._pending.clear()
        return updates
