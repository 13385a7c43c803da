"""What the operator reads off a server pod object (pure: pod dict in, `PodObservation` out)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from loraplex.operator.engine_client import AdapterReport, pod_url

SERVER_CONTAINER = "server"  # names set by render.deployment
HTTP_PORT_NAME = "http"
# Waiting reasons that do not fix themselves: the deployment is Failed until someone acts.
STUCK_REASONS = frozenset(
    {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError"}
)


@dataclass(frozen=True)
class PodObservation:
    """One pod of a base model: Kubernetes' view, then (if it was asked) the engine's."""

    name: str
    ip: str | None = None
    port: int | None = None  # the server container's `http` port
    running: bool = False  # server container running and the pod not terminating
    terminating: bool = False
    ready: bool = False  # the pod's Ready condition (includes our readiness gate)
    epoch: str | None = None  # changes whenever the server container (re)starts
    unschedulable: str | None = None  # the scheduler's message while the pod cannot be placed
    stuck: str | None = None  # "Reason: message" of a waiting state that needs a human
    reports: tuple[AdapterReport, ...] | None = None  # None: not asked, or no answer
    error: str | None = None  # why there are no reports

    @property
    def reachable(self) -> bool:
        return self.reports is not None

    @cached_property
    def reports_by_name(self) -> dict[str, AdapterReport]:
        return {report.name: report for report in self.reports or ()}

    @property
    def url(self) -> str | None:
        """Where to reach the engine; None until the pod runs with an IP."""
        if not self.running or not self.ip or not self.port:
            return None
        return pod_url(self.ip, self.port)

    def with_reports(self, reports: list[AdapterReport]) -> PodObservation:
        return replace(self, reports=tuple(reports), error=None)

    def with_error(self, error: str) -> PodObservation:
        return replace(self, reports=None, error=error)


def observe_pod(pod: Mapping[str, Any]) -> PodObservation:
    """Kubernetes' side of the observation; `with_reports` adds the engine's."""
    meta, status = pod.get("metadata", {}), pod.get("status", {}) or {}
    container = _server_status(status)
    terminating = bool(meta.get("deletionTimestamp"))
    running = bool(container and "running" in (container.get("state") or {})) and not terminating
    return PodObservation(
        name=meta["name"],
        ip=status.get("podIP"),
        port=_http_port(pod.get("spec", {}) or {}),
        running=running,
        terminating=terminating,
        ready=_condition(status, "Ready").get("status") == "True",
        epoch=engine_epoch(container) if running else None,
        unschedulable=_unschedulable(status),
        stuck=_stuck(container),
    )


def engine_epoch(container_status: Mapping[str, Any] | None) -> str | None:
    """Restart count and start time of the running server container: a new value = a new process
    whose adapters must be loaded again."""
    if not container_status:
        return None
    started = ((container_status.get("state") or {}).get("running") or {}).get("startedAt")
    return f"{container_status.get('restartCount', 0)}@{started}" if started else None


def readiness_condition(pod: Mapping[str, Any], condition_type: str) -> bool | None:
    """The current value of a pod condition (e.g. our readiness gate), None when unset."""
    status = _condition(pod.get("status", {}) or {}, condition_type).get("status")
    return None if status is None else status == "True"


def _http_port(spec: Mapping[str, Any]) -> int | None:
    for container in spec.get("containers") or ():
        if container.get("name") == SERVER_CONTAINER:
            for port in container.get("ports") or ():
                if port.get("name") == HTTP_PORT_NAME:
                    return int(port["containerPort"])
    return None


def _server_status(status: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for container in status.get("containerStatuses") or ():
        if container.get("name") == SERVER_CONTAINER:
            return container
    return None


def _condition(status: Mapping[str, Any], condition_type: str) -> Mapping[str, Any]:
    for condition in status.get("conditions") or ():
        if condition.get("type") == condition_type:
            return condition
    return {}


def _unschedulable(status: Mapping[str, Any]) -> str | None:
    scheduled = _condition(status, "PodScheduled")
    if scheduled.get("status") == "False" and scheduled.get("reason") == "Unschedulable":
        return scheduled.get("message") or "pod cannot be scheduled"
    return None


def _stuck(container: Mapping[str, Any] | None) -> str | None:
    waiting = ((container or {}).get("state") or {}).get("waiting") or {}
    if waiting.get("reason") in STUCK_REASONS:
        return f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
    return None
