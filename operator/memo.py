"""What `decide` remembers between passes so that a pass over 1000 adapters costs O(changed):
each adapter's status is recomputed only when one of its inputs changed.

Pure in effect: an entry is used only when every input equals the one it was computed from (the
verdict, the stored status — the same object —, each pod's state and report of the adapter, its
failed attempts, its access condition), so `decide(observed, cache)` returns what
`decide(observed)` would. `now` enters a status only as the time of a condition that changes,
and a change of inputs is a miss; a backoff deadline passing is part of the key.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from loraplex.operator.admission import Verdict
from loraplex.operator.common import Condition
from loraplex.operator.lora import LoraAdapterStatus
from loraplex.operator.plan import PodAdapter, StatusPatch
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import Attempt

ObjectKey = tuple[str, str]  # (namespace, name) of a LoraAdapter


@dataclass
class _Entry:
    inputs: tuple[Any, ...]
    stored: Mapping[str, Any]  # the stored status it was compared with (identity, not equality)
    status: LoraAdapterStatus
    patch: StatusPatch | None


@dataclass
class DecideCache:
    """One base's memo; `explain` and the tests call `decide` without one."""

    statuses: dict[ObjectKey, _Entry] = field(default_factory=dict)
    hits: int = 0
    misses: int = 0

    def lookup(self, key: ObjectKey, inputs: tuple[Any, ...], stored: Mapping[str, Any]) -> _Entry | None:
        entry = self.statuses.get(key)
        if entry is not None and entry.stored is stored and entry.inputs == inputs:
            self.hits += 1
            return entry
        self.misses += 1
        return None

    def store(self, key: ObjectKey, entry: _Entry) -> None:
        self.statuses[key] = entry

    def keep_only(self, keys: set[ObjectKey]) -> None:
        for gone in set(self.statuses) - keys:
            del self.statuses[gone]


def entry(
    inputs: tuple[Any, ...], stored: Mapping[str, Any], status: LoraAdapterStatus, patch: StatusPatch | None
) -> _Entry:
    return _Entry(inputs, stored, status, patch)


def status_inputs(
    verdict: Verdict,
    pods: Sequence[PodObservation],
    attempts: Sequence[tuple[str, Attempt]],
    access: Condition | None,
    now: float,
) -> tuple[Any, ...]:
    """Everything an adapter's status is computed from, besides its stored status."""
    name = verdict.adapter.name if verdict.adapter is not None else None
    pod_part = tuple(
        (
            pod.name,
            pod.terminating,
            pod.reachable,
            pod.ready,
            pod.epoch,
            pod.stuck,
            pod.error,
            pod.reports_by_name.get(name) if name is not None else None,
        )
        for pod in pods
    )
    attempt_part = tuple((pod, attempt, attempt.next_attempt_at > now) for pod, attempt in attempts)
    return verdict, pod_part, attempt_part, access


def attempts_by_name(attempts: Mapping[PodAdapter, Attempt]) -> dict[str, list[tuple[str, Attempt]]]:
    grouped: dict[str, list[tuple[str, Attempt]]] = {}
    for (pod, served), attempt in sorted(attempts.items(), key=lambda item: item[0]):
        grouped.setdefault(served, []).append((pod, attempt))
    return grouped
