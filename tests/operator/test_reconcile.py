"""Convergence policy: what to load and unload on which pod, with backoff and rolling replacement."""

from __future__ import annotations

from typing import Any

from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import (
    BACKOFF_MAX_S,
    Attempt,
    Load,
    Unload,
    backoff_s,
    is_settled,
    matches,
    plan,
    plan_pod,
    record_failure,
)

SQL = DesiredAdapter(name="sql", source="hf://org/sql", revision="v1")
CHAT = DesiredAdapter(name="chat", source="hf://org/chat", aliases=("assistant",))
DESIRED = {"sql": SQL, "chat": CHAT}


def report(adapter: DesiredAdapter, state: str = "ready", **changes: Any) -> AdapterReport:
    fields = {
        "name": adapter.name,
        "source": adapter.source,
        "state": state,
        "revision": adapter.revision,
        "aliases": adapter.aliases,
        "pinned": adapter.pinned,
    }
    return AdapterReport(**{**fields, **changes})


def pod(name: str, *reports: AdapterReport, epoch: str = "0@t0") -> PodObservation:
    return PodObservation(name=name, ip="10.0.0.1", running=True, epoch=epoch, reports=tuple(reports))


def test_empty_pod_loads_everything_in_name_order() -> None:
    assert plan_pod(DESIRED, pod("p"), {}, now=0) == [Load(CHAT), Load(SQL)]


def test_converged_pod_needs_nothing_and_extra_adapters_are_unloaded() -> None:
    extra = AdapterReport(name="old", source="hf://org/old", state="ready")
    assert plan_pod(DESIRED, pod("p", report(SQL), report(CHAT)), {}, now=0) == []
    assert plan_pod(DESIRED, pod("p", report(SQL), report(CHAT), extra), {}, now=0) == [Unload("old")]


def test_loading_adapters_are_left_alone() -> None:
    assert plan_pod(DESIRED, pod("p", report(SQL, "loading"), report(CHAT)), {}, now=0) == []


def test_changed_version_is_replaced_unload_first() -> None:
    stale = report(SQL, revision="v0")
    assert plan_pod(DESIRED, pod("p", stale, report(CHAT)), {}, now=0) == [Unload("sql"), Load(SQL)]


def test_failed_load_retries_after_backoff_only() -> None:
    failed = report(SQL, "failed", error="rank 128 > 64")
    attempt = record_failure(None, "0@t0", SQL, "rank 128 > 64", now=100)
    assert attempt.attempts == 1 and attempt.next_attempt_at == 100 + backoff_s(1)
    state = pod("p", failed, report(CHAT))
    assert plan_pod(DESIRED, state, {"sql": attempt}, now=101) == []
    assert plan_pod(DESIRED, state, {"sql": attempt}, now=attempt.next_attempt_at) == [
        Unload("sql"),
        Load(SQL),
    ]


def test_restart_or_changed_adapter_skips_the_backoff() -> None:
    attempt = record_failure(None, "0@t0", SQL, "boom", now=100)
    restarted = pod("p", report(CHAT), epoch="1@t1")  # new process: nothing loaded, old failures moot
    assert plan_pod(DESIRED, restarted, {"sql": attempt}, now=101) == [Load(SQL)]
    fixed = DesiredAdapter(name="sql", source="hf://org/sql-fixed", revision="v1")
    assert plan_pod({"sql": fixed}, pod("p"), {"sql": attempt}, now=101) == [Load(fixed)]


def test_backoff_grows_and_is_capped() -> None:
    first = record_failure(None, "e", SQL, "x", now=0)
    second = record_failure(first, "e", SQL, "y", now=0)
    assert (second.attempts, second.last_error) == (2, "y")
    assert backoff_s(2) == 2 * backoff_s(1)
    assert backoff_s(30) == BACKOFF_MAX_S
    assert record_failure(second, "other-epoch", SQL, "z", now=0).attempts == 1


def test_matching_tolerates_what_the_pod_leaves_empty() -> None:
    assert matches(SQL, report(SQL, revision=None))
    assert not matches(SQL, report(SQL, revision="v2"))
    assert not matches(CHAT, report(CHAT, aliases=()))
    pinned = DesiredAdapter(name="chat", source=CHAT.source, aliases=CHAT.aliases, pinned=True)
    assert not matches(pinned, report(CHAT))


def test_settled_means_ready_or_failed_for_every_desired_adapter() -> None:
    assert is_settled(DESIRED, [report(SQL), report(CHAT, "failed")])
    assert is_settled(DESIRED, [report(SQL, revision="v0"), report(CHAT)])  # old version still serves
    assert not is_settled(DESIRED, [report(SQL)])
    assert not is_settled(DESIRED, [report(SQL, "loading"), report(CHAT)])


def test_plan_skips_unreachable_pods() -> None:
    down = PodObservation(name="down", error="connection refused")
    assert plan(DESIRED, [down, pod("up")], {}, now=0) == {"up": [Load(CHAT), Load(SQL)]}


def test_stale_versions_are_replaced_one_pod_at_a_time() -> None:
    stale = (report(SQL, revision="v0"), report(CHAT))
    first = plan(DESIRED, [pod("a", *stale), pod("b", *stale)], {}, now=0)
    assert first == {"a": [Unload("sql"), Load(SQL)], "b": []}
    # While `a` reloads, `b` keeps serving the old version.
    second = plan(DESIRED, [pod("a", report(SQL, "loading"), report(CHAT)), pod("b", *stale)], {}, now=1)
    assert second == {"a": [], "b": []}
    third = plan(DESIRED, [pod("a", report(SQL), report(CHAT)), pod("b", *stale)], {}, now=2)
    assert third == {"a": [], "b": [Unload("sql"), Load(SQL)]}


def test_missing_adapters_load_everywhere_at_once() -> None:
    result = plan(DESIRED, [pod("a"), pod("b", report(CHAT))], {}, now=0)
    assert result == {"a": [Load(CHAT), Load(SQL)], "b": [Load(SQL)]}


def test_attempts_are_per_pod() -> None:
    attempt = Attempt(epoch="0@t0", adapter=SQL, attempts=1, next_attempt_at=50)
    result = plan({"sql": SQL}, [pod("a"), pod("b")], {("a", "sql"): attempt}, now=10)
    assert result == {"a": [], "b": [Load(SQL)]}
