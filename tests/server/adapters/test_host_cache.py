"""Host-memory tier: LRU by count and bytes; in-flight and pinned adapters are never dropped."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.adapters.host_cache import HostCache, HostCacheLimits
from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.registry import AdapterEntry
from loraplex.server.sequence import AdapterRef


def entry(name: str, num_floats: int = 10, pinned: bool = False) -> AdapterEntry:
    a, b = torch.zeros(1, num_floats // 2), torch.zeros(num_floats // 2, 1)
    weights = LoraWeights(name=name, rank=1, target_modules=("q_proj",), tensors={(0, "q_proj"): (a, b)})
    return AdapterEntry(AdapterRef(name, 1), weights, source=f"/a/{name}", pinned=pinned)


def test_least_recently_used_is_dropped_by_count() -> None:
    cache = HostCache(HostCacheLimits(max_count=2))
    a, b, c = entry("a"), entry("b"), entry("c")
    assert cache.put(a) == [] and cache.put(b) == []
    cache.touch("a")  # b is now the least recently used
    assert cache.put(c) == [b]
    assert b.weights is None and a.weights is not None and "b" not in cache and len(cache) == 2
    assert cache.num_evictions == 1


def test_byte_budget() -> None:
    cache = HostCache(HostCacheLimits(max_count=10, max_bytes=100))  # each entry: 40 bytes
    entries = [entry(n) for n in "abc"]
    dropped = [e for x in entries for e in cache.put(x)]
    assert dropped == [entries[0]] and cache.num_bytes == 80


def test_in_flight_and_pinned_stay_even_over_budget() -> None:
    cache = HostCache(HostCacheLimits(max_count=1))
    busy, pinned, new = entry("busy"), entry("pinned", pinned=True), entry("new")
    busy.num_requests = 1
    cache.put(busy)
    cache.put(pinned)
    assert cache.put(new) == [] and len(cache) == 3  # over budget rather than fail a request
    busy.num_requests = 0
    assert cache.put(entry("newer")) == [busy, new]
    assert pinned.weights is not None


def test_discard_forgets_and_limits_are_checked() -> None:
    cache = HostCache(HostCacheLimits(max_count=2))
    cache.put(entry("a"))
    cache.discard("a")
    assert "a" not in cache and cache.num_bytes == 0
    with pytest.raises(ValueError):
        HostCacheLimits(max_count=0)
    empty = entry("e")
    empty.weights = None
    with pytest.raises(ValueError):
        cache.put(empty)
