"""Reading pod objects: running, ready, engine epoch, scheduling and stuck states."""

from __future__ import annotations

from typing import Any

from loraplex.operator.engine_client import AdapterReport
from loraplex.operator.pods import engine_epoch, observe_pod, readiness_condition


def pod_body(**status: Any) -> dict[str, Any]:
    ports = [{"name": "metrics", "containerPort": 9090}, {"name": "http", "containerPort": 8080}]
    spec = {"containers": [{"name": "server", "ports": ports}]}
    return {"metadata": {"name": "gemma-abc"}, "spec": spec, "status": status}


RUNNING = {
    "name": "server",
    "restartCount": 2,
    "ready": True,
    "state": {"running": {"startedAt": "2026-11-22T10:00:00Z"}},
}


def test_running_ready_pod() -> None:
    body = pod_body(
        podIP="10.1.2.3",
        containerStatuses=[RUNNING],
        conditions=[
            {"type": "Ready", "status": "True"},
            {"type": "loraplex.dev/adapters-ready", "status": "False"},
        ],
    )
    observed = observe_pod(body)
    assert (observed.name, observed.ip, observed.running, observed.ready) == (
        "gemma-abc",
        "10.1.2.3",
        True,
        True,
    )
    assert observed.epoch == "2@2026-11-22T10:00:00Z"
    assert observed.url == "http://10.1.2.3:8080"
    assert observed.reports is None and not observed.reachable
    assert readiness_condition(body, "loraplex.dev/adapters-ready") is False
    assert readiness_condition(body, "Other") is None


def test_epoch_changes_with_restart_and_is_none_when_not_running() -> None:
    restarted = {**RUNNING, "restartCount": 3, "state": {"running": {"startedAt": "2026-11-22T10:05:00Z"}}}
    assert engine_epoch(restarted) != engine_epoch(RUNNING)
    assert engine_epoch({"name": "server", "state": {"waiting": {"reason": "ContainerCreating"}}}) is None
    assert engine_epoch(None) is None


def test_terminating_pod_is_not_running() -> None:
    body = pod_body(podIP="10.1.2.3", containerStatuses=[RUNNING])
    body["metadata"]["deletionTimestamp"] = "2026-11-22T10:06:00Z"
    observed = observe_pod(body)
    assert observed.running is False and observed.epoch is None and observed.terminating
    assert observed.url is None


def test_unschedulable_pod_carries_the_scheduler_message() -> None:
    condition = {
        "type": "PodScheduled",
        "status": "False",
        "reason": "Unschedulable",
        "message": "0/3 nodes: insufficient nvidia.com/gpu",
    }
    observed = observe_pod(pod_body(conditions=[condition]))
    assert observed.unschedulable == "0/3 nodes: insufficient nvidia.com/gpu"
    assert observed.running is False


def test_stuck_waiting_reasons_are_reported_but_creating_is_not() -> None:
    crash = {"name": "server", "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m"}}}
    assert observe_pod(pod_body(containerStatuses=[crash])).stuck == "CrashLoopBackOff: back-off 5m"
    creating = {"name": "server", "state": {"waiting": {"reason": "ContainerCreating"}}}
    assert observe_pod(pod_body(containerStatuses=[creating])).stuck is None
    other = {**crash, "name": "sidecar"}
    assert observe_pod(pod_body(containerStatuses=[other])).stuck is None


def test_reports_and_errors_replace_each_other() -> None:
    observed = observe_pod(pod_body(podIP="10.1.2.3", containerStatuses=[RUNNING]))
    reported = observed.with_reports([AdapterReport(name="sql", state="ready")])
    assert reported.reachable and reported.reports[0].name == "sql"
    failed = reported.with_error("connection refused")
    assert (failed.reports, failed.error) == (None, "connection refused")
