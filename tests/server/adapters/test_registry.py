"""Adapter registry: versions, aliases, slot assignment with LRU among idle slots."""

from __future__ import annotations

import pytest

from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.registry import AdapterEntry, AdapterRegistry
from loraplex.server.sequence import AdapterRef


def entry(name: str, aliases: tuple[str, ...] = (), pinned: bool = False) -> AdapterEntry:
    weights = LoraWeights(name=name, rank=4, target_modules=("q_proj",), tensors={})
    return AdapterEntry(
        AdapterRef(name, 0), weights, source=f"/adapters/{name}", aliases=aliases, pinned=pinned
    )


def test_each_load_gets_a_new_generation() -> None:
    reg = AdapterRegistry(2)
    first = reg.add(entry("a"))
    second = reg.add(entry("a"))
    assert second.ref.generation > first.ref.generation
    assert reg.get("a") is second and [e.name for e in reg.entries()] == ["a"]


def test_aliases_resolve_and_conflicts_are_refused() -> None:
    reg = AdapterRegistry(2)
    reg.add(entry("a", aliases=("alpha",)))
    assert reg.get("alpha").name == "a" and "alpha" in reg
    with pytest.raises(ValueError):
        reg.add(entry("b", aliases=("alpha",)))
    reg.remove("alpha")
    assert "a" not in reg and "alpha" not in reg
    with pytest.raises(KeyError):
        reg.get("a")


def test_slots_fill_then_evict_least_recently_used_idle() -> None:
    reg = AdapterRegistry(2)
    refs = [reg.add(entry(n)).ref for n in "abc"]
    assert reg.acquire_slot(refs[0]) == 0 and reg.acquire_slot(refs[1]) == 1
    assert not reg.can_acquire_slot(refs[2])  # both slots in use
    reg.release_slot(refs[1])
    reg.release_slot(refs[0])  # a used more recently than b
    assert reg.acquire_slot(refs[2]) == 1
    assert reg.slot_of(refs[1]) is None and reg.slot_of(refs[0]) == 0
    updates = reg.take_slot_updates()
    assert [(u.slot, u.weights.name) for u in updates] == [(0, "a"), (1, "c")]
    assert reg.take_slot_updates() == []


def test_resident_adapter_is_not_copied_again() -> None:
    reg = AdapterRegistry(1)
    ref = reg.add(entry("a")).ref
    reg.acquire_slot(ref)
    reg.take_slot_updates()
    reg.release_slot(ref)
    assert reg.acquire_slot(ref) == 0 and reg.take_slot_updates() == []


def test_pinned_adapter_is_never_evicted() -> None:
    reg = AdapterRegistry(1)
    pinned = reg.add(entry("p", pinned=True)).ref
    other = reg.add(entry("o")).ref
    reg.acquire_slot(pinned)
    reg.release_slot(pinned)
    assert not reg.can_acquire_slot(other)
    assert reg.slot_users() == {}


def test_reload_keeps_old_version_alive_for_requests_in_flight() -> None:
    reg = AdapterRegistry(2)
    reg.add(entry("a"))
    old = reg.retain("a")
    assert reg.acquire_slot(old) == 0
    new = reg.add(entry("a")).ref
    assert reg.version(old).name == "a" and reg.slot_of(old) == 0
    assert reg.acquire_slot(new) == 1  # the old slot is still being read
    reg.release_slot(old)
    reg.release(old)
    with pytest.raises(KeyError):
        reg.version(old)
    assert reg.slot_of(old) is None
    updates = {u.slot: u.weights for u in reg.take_slot_updates()}
    assert updates[0] is None and updates[1] is reg.version(new).weights


def test_retain_counts_requests_served() -> None:
    reg = AdapterRegistry(1)
    reg.add(entry("a"))
    ref = reg.retain("a")
    reg.release(ref)
    reg.retain("a")
    assert reg.get("a").requests_served == 2 and reg.num_in_flight(ref) == 1


def test_slot_counters_and_weights_must_be_in_memory() -> None:
    reg = AdapterRegistry(1)
    a, b = reg.add(entry("a")), reg.add(entry("b"))
    assert reg.acquire_slot(a.ref) == 0
    reg.release_slot(a.ref)
    b.weights = None  # dropped from host memory: the manager reads it back before a request enters
    with pytest.raises(RuntimeError, match="host memory"):
        reg.acquire_slot(b.ref)
    assert (reg.num_slot_loads, reg.num_slot_evictions) == (1, 0)
    b.weights = a.weights
    assert reg.acquire_slot(b.ref) == 0 and (reg.num_slot_loads, reg.num_slot_evictions) == (2, 1)
    assert reg.in_slot("b") and not reg.in_slot("a")
