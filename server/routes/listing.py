"""Revisions for `GET /v1/adapters?since=<instance>:<revision>`: what changed since a client's
last list, so a poller of 1000 adapters gets (and parses) only the few that moved.

Every list call first compares each adapter's report with the one the previous call saw and
gives a changed or new one the next revision (an adapter gone gets one too, as a removal). A
client sends back the `instance` and `revision` it was given; the answer holds the adapters
whose revision is newer and the names removed since. The comparison is of the whole report,
so anything the report shows (state, tier, token counts, access) counts as a change. A client
gets the full list instead (`full: true`) when it names another instance (this process
restarted) or a revision older than the removals still remembered.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

MAX_REMOVED = 4096  # removals remembered; a client further behind gets the full list


@dataclass(frozen=True)
class Cursor:
    instance: str
    revision: int

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """`<instance>:<revision>`; ValueError when it is not that."""
        instance, sep, revision = text.rpartition(":")
        if not sep or not instance or not revision.isdigit():
            raise ValueError(f"since must be '<instance>:<revision>' as a list returned it, not {text!r}")
        return cls(instance, int(revision))


@dataclass(frozen=True)
class Listing:
    """One answer; `full`: `data` is every adapter (no `since`, or one that cannot be answered)."""

    data: list[dict[str, Any]]
    removed: list[str]
    revision: int
    instance: str
    full: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": self.data,
            "instance": self.instance,
            "revision": self.revision,
            "full": self.full,
            "removed": self.removed,
        }


class AdapterListing:
    def __init__(self) -> None:
        self.instance = uuid.uuid4().hex[:16]
        self.revision = 0
        self._seen: dict[str, tuple[dict[str, Any], int]] = {}  # name -> (report, its revision)
        self._removed: dict[str, int] = {}  # name -> the revision of its removal (oldest first)
        self._floor = 0  # removals at or before this revision are forgotten

    def answer(self, reports: Sequence[dict[str, Any]], since: Cursor | None) -> Listing:
        self._scan(reports)
        full = (
            since is None
            or since.instance != self.instance
            or not self._floor <= since.revision <= self.revision
        )
        if full:
            data, removed = list(reports), []
        else:
            assert since is not None
            data = [report for report in reports if self._seen[report["name"]][1] > since.revision]
            removed = [name for name, at in self._removed.items() if at > since.revision]
        return Listing(data, removed, self.revision, self.instance, full)

    def _scan(self, reports: Sequence[dict[str, Any]]) -> None:
        names = set()
        for report in reports:
            name = report["name"]
            names.add(name)
            seen = self._seen.get(name)
            if seen is None or seen[0] != report:
                self.revision += 1
                self._seen[name] = (report, self.revision)
                self._removed.pop(name, None)
        for name in [name for name in self._seen if name not in names]:
            self.revision += 1
            del self._seen[name]
            self._removed[name] = self.revision
        while len(self._removed) > MAX_REMOVED:
            oldest = next(iter(self._removed))
            self._floor = self._removed.pop(oldest)
