"""freeze_startup_objects: what is alive after start-up leaves the collected generations."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from loraplex.server.startup_heap import freeze_startup_objects


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()  # the rest of the suite collects as usual


class Node:
    def __init__(self) -> None:
        self.peer: Node | None = None


def test_objects_alive_at_start_up_are_no_longer_walked_by_collections(unfrozen: None) -> None:
    kept = [Node() for _ in range(1000)]
    assert any(o is kept[0] for o in gc.get_objects())
    frozen = freeze_startup_objects()
    assert frozen >= len(kept)
    assert not any(o is kept[0] for o in gc.get_objects())  # no generation holds it any more


def test_garbage_made_after_start_up_is_still_collected(unfrozen: None) -> None:
    freeze_startup_objects()
    cycle_a, cycle_b = Node(), Node()
    cycle_a.peer, cycle_b.peer = cycle_b, cycle_a
    alive = weakref.ref(cycle_a)
    del cycle_a, cycle_b
    assert alive() is not None  # a cycle: only the collector frees it
    gc.collect()
    assert alive() is None
