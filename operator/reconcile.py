"""Pure convergence policy: the desired adapter set vs what each pod reported -> load/unload actions.

The daemon calls `plan` once per cycle with fresh reports (the pods are the truth), runs the
actions, and records failed attempts so retries back off. Nothing here does I/O.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport, AdapterState
from loraplex.operator.pods import PodObservation

BACKOFF_BASE_S = 10.0
BACKOFF_MAX_S = 600.0

READY, LOADING, FAILED = AdapterState.READY, AdapterState.LOADING, AdapterState.FAILED


@dataclass(frozen=True)
class Load:
    adapter: DesiredAdapter


@dataclass(frozen=True)
class Unload:
    name: str


Action = Load | Unload


@dataclass(frozen=True)
class Attempt:
    """Failed load attempts of one adapter version on one pod in one engine epoch (kept in
    LoraAdapter status, so backoff survives an operator restart)."""

    epoch: str | None
    adapter: DesiredAdapter
    attempts: int = 0
    next_attempt_at: float = 0.0  # unix seconds
    last_error: str | None = None
    error_type: str | None = None  # the engine's, when it refused the load

    def applies_to(self, epoch: str | None, adapter: DesiredAdapter) -> bool:
        """A new process or a changed adapter starts over without waiting."""
        return self.epoch == epoch and self.adapter == adapter


def backoff_s(attempts: int) -> float:
    return min(BACKOFF_BASE_S * 2 ** max(attempts - 1, 0), BACKOFF_MAX_S)


def record_failure(
    previous: Attempt | None,
    epoch: str | None,
    adapter: DesiredAdapter,
    error: str,
    now: float,
    error_type: str | None = None,
) -> Attempt:
    count = previous.attempts + 1 if previous and previous.applies_to(epoch, adapter) else 1
    return Attempt(epoch, adapter, count, now + backoff_s(count), error, error_type)


def matches(adapter: DesiredAdapter, report: AdapterReport) -> bool:
    """Whether the pod holds this version of the adapter. Fields the pod leaves empty count as
    matching: only a contradiction forces a reload."""
    return (
        report.source == adapter.source
        and (adapter.revision is None or report.revision in (None, adapter.revision))
        and (adapter.sha256 is None or report.sha256 in (None, adapter.sha256))
        and sorted(report.aliases) == sorted(adapter.aliases)
        and report.pinned == adapter.pinned
    )


def is_settled(desired: Mapping[str, DesiredAdapter], reports: Sequence[AdapterReport]) -> bool:
    """Every desired adapter reached an end state on the pod (ready, any version, or failed): the
    readiness-gate rule. A failed adapter never holds a pod out of service; a missing one does."""
    states = {report.name: report.state for report in reports}
    return all(states.get(name) in (READY, FAILED) for name in desired)


def plan(
    desired: Mapping[str, DesiredAdapter],
    pods: Sequence[PodObservation],
    attempts: Mapping[tuple[str, str], Attempt],
    now: float,
) -> dict[str, list[Action]]:
    """Actions per reachable pod, to run in order on that pod (pods in parallel).

    Replacing a stale but serving version happens on one pod per cycle, and only while every
    other pod is settled: an adapter update never takes all pods out of service at once.
    """
    reachable = [pod for pod in pods if pod.reports is not None]
    unsettled = {pod.name for pod in reachable if not is_settled(desired, pod.reports or ())}
    may_replace = next(
        (pod.name for pod in reachable if _has_stale(desired, pod) and not unsettled - {pod.name}), None
    )
    actions: dict[str, list[Action]] = {}
    for pod in reachable:
        pod_attempts = {name: a for (pod_name, name), a in attempts.items() if pod_name == pod.name}
        actions[pod.name] = plan_pod(desired, pod, pod_attempts, now, replace_stale=pod.name == may_replace)
    return actions


def _has_stale(desired: Mapping[str, DesiredAdapter], pod: PodObservation) -> bool:
    return any(
        report.state == READY and report.name in desired and not matches(desired[report.name], report)
        for report in pod.reports or ()
    )


def plan_pod(
    desired: Mapping[str, DesiredAdapter],
    pod: PodObservation,
    attempts: Mapping[str, Attempt],
    now: float,
    *,
    replace_stale: bool = True,
) -> list[Action]:
    reported = {report.name: report for report in pod.reports or ()}
    actions: list[Action] = [Unload(name) for name in sorted(reported) if name not in desired]
    for name in sorted(desired):
        adapter, report = desired[name], reported.get(name)
        if report is not None and report.state == LOADING:
            continue
        if report is not None and report.state == READY and (matches(adapter, report) or not replace_stale):
            continue
        attempt = attempts.get(name)
        if attempt is not None and attempt.applies_to(pod.epoch, adapter) and now < attempt.next_attempt_at:
            continue
        if report is not None:  # a failed or stale entry holds the name: free it first
            actions.append(Unload(name))
        actions.append(Load(adapter))
    return actions


def readiness_gate(
    pod: PodObservation, desired: Mapping[str, DesiredAdapter], current: Mapping[str, Any] | None
) -> dict[str, str] | None:
    """The pod condition to write for the readiness gate, or None when it should stay as it is.

    The gate opens once per engine epoch, when every desired adapter settled on the pod; adapters
    added later never close it again (the pod keeps serving the others while they hot-load). The
    epoch is recorded in the message, so a restarted engine closes the gate until it reloads.
    """
    if not pod.running or pod.epoch is None:
        return None
    epoch_note = f"engine epoch {pod.epoch}"
    is_open = current is not None and current.get("status") == "True"
    if is_open and current.get("message") == epoch_note:
        return None
    settled = pod.reports is not None and is_settled(desired, pod.reports)
    wanted = {
        "status": "True" if settled else "False",
        "reason": "AdaptersLoaded" if settled else "AdaptersLoading",
        "message": epoch_note,
    }
    if current is not None and all(current.get(key) == value for key, value in wanted.items()):
        return None
    return wanted
