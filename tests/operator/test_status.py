"""Status from pod reports: instances, phases, conditions with the engine's text, counts."""

from __future__ import annotations

from typing import Any

from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentStatus, BmdPhase
from loraplex.operator.common import Condition, ConditionStatus
from loraplex.operator.conditions import condition, find, merge_conditions, timestamp
from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport
from loraplex.operator.lora import InstanceState, LoraAdapterStatus, LoraPhase
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import readiness_gate, record_failure
from loraplex.operator.status import attempts_from_status, bmd_status, lora_status

SQL = DesiredAdapter(name="sql", source="hf://org/sql")
CHAT = DesiredAdapter(name="chat", source="hf://org/chat")
NOW = 1_800_000_000.0


def ready(adapter: DesiredAdapter, **changes: Any) -> AdapterReport:
    fields = {
        "name": adapter.name,
        "source": adapter.source,
        "state": "ready",
        "rank": 8,
        "loaded_at": NOW - 60,
    }
    return AdapterReport(**{**fields, **changes})


def pod(name: str, *reports: AdapterReport, ready_: bool = True, **fields: Any) -> PodObservation:
    base = PodObservation(name=name, ip="10.0.0.2", running=True, ready=ready_, epoch="0@t", **fields)
    return base.with_reports(list(reports))


def bmd(replicas: int = 2) -> BaseModelDeployment:
    body = {
        "metadata": {"name": "gemma", "namespace": "llm", "uid": "u", "generation": 4},
        "spec": {"model": {"id": "m"}, "replicas": replicas},
    }
    return BaseModelDeployment.from_body(body)


def test_ready_on_every_pod() -> None:
    status = lora_status(SQL, 7, [pod("a", ready(SQL)), pod("b", ready(SQL))], {}, LoraAdapterStatus(), NOW)
    assert (status.phase, status.ready_replicas, status.desired_replicas) == (LoraPhase.READY, 2, 2)
    assert status.served_name == "sql" and status.resolved.rank == 8
    assert [item.state for item in status.instances] == [InstanceState.READY, InstanceState.READY]
    assert status.instances[0].loaded_at == timestamp(NOW - 60)
    ready_condition = find(status.conditions, "Ready")
    assert ready_condition.status == ConditionStatus.TRUE and ready_condition.observed_generation == 7


def test_partially_ready_while_a_pod_loads() -> None:
    pods = [pod("a", ready(SQL)), pod("b", ready(SQL, state="loading"))]
    status = lora_status(SQL, 1, pods, {}, LoraAdapterStatus(), NOW)
    assert status.phase == LoraPhase.PARTIALLY_READY
    assert find(status.conditions, "Loaded").status == ConditionStatus.TRUE
    assert find(status.conditions, "Ready").message == "1/2 pods"


def test_engine_refusal_becomes_failed_with_its_text() -> None:
    refused = ready(
        SQL, state="failed", error="rank 128 exceeds max_lora_rank 64", error_type="rank_exceeds_max"
    )
    status = lora_status(SQL, 1, [pod("a", refused), pod("b", refused)], {}, LoraAdapterStatus(), NOW)
    assert status.phase == LoraPhase.FAILED
    failure = find(status.conditions, "RankExceedsBase")
    assert failure.status == ConditionStatus.TRUE and failure.reason == "RankExceedsMax"
    assert failure.message == "rank 128 exceeds max_lora_rank 64 (pods: a, b)"
    assert status.instances[0].last_error == "rank 128 exceeds max_lora_rank 64"


def test_refused_load_the_pod_did_not_keep_shows_from_our_record() -> None:
    attempt = record_failure(None, "0@t", SQL, "no such repo", NOW - 5, error_type="adapter_download")
    status = lora_status(SQL, 1, [pod("a")], {"a": attempt}, LoraAdapterStatus(), NOW)
    (item,) = status.instances
    assert (item.state, item.attempts, item.last_error) == (InstanceState.FAILED, 1, "no such repo")
    assert item.next_attempt_at == timestamp(attempt.next_attempt_at)
    assert find(status.conditions, "SourceUnavailable").message == "no such repo (pods: a)"


def test_unreachable_pod_is_pending_with_the_reason() -> None:
    down = PodObservation(name="b", running=True, epoch="0@t").with_error("connection refused")
    status = lora_status(SQL, 1, [pod("a", ready(SQL)), down], {}, LoraAdapterStatus(), NOW)
    assert [(item.pod, item.state, item.last_error) for item in status.instances] == [
        ("a", InstanceState.READY, None),
        ("b", InstanceState.PENDING, "connection refused"),
    ]


def test_no_pods_is_pending_and_terminating_pods_do_not_count() -> None:
    leaving = pod("old", ready(SQL), terminating=True)
    status = lora_status(SQL, 1, [leaving], {}, LoraAdapterStatus(), NOW)
    assert (status.phase, status.desired_replicas, status.instances) == (LoraPhase.PENDING, 0, [])
    unstarted = lora_status(SQL, 1, [PodObservation(name="new")], {}, LoraAdapterStatus(), NOW)
    assert (unstarted.phase, unstarted.desired_replicas) == (LoraPhase.PENDING, 1)
    mixed = lora_status(SQL, 1, [PodObservation(name="new"), pod("a")], {}, LoraAdapterStatus(), NOW)
    assert mixed.phase == LoraPhase.PENDING  # reachable but not yet asked to load: still pending


def test_recovery_clears_failure_condition_but_keeps_accepted() -> None:
    accepted = condition("Accepted", True, "Accepted", generation=1).model_copy(
        update={"last_transition_time": "2026-01-01T00:00:00Z"}
    )
    refused = ready(SQL, state="failed", error="boom")
    failed = lora_status(SQL, 1, [pod("a", refused)], {}, LoraAdapterStatus(conditions=[accepted]), NOW)
    assert find(failed.conditions, "LoadFailed") is not None
    recovered = lora_status(SQL, 1, [pod("a", ready(SQL))], {}, failed, NOW + 30)
    assert find(recovered.conditions, "LoadFailed") is None
    assert find(recovered.conditions, "Accepted") == accepted


def test_merge_keeps_transition_time_while_status_holds() -> None:
    first = merge_conditions([], [condition("Ready", False, "Loading")], "t1")
    same = merge_conditions(first, [condition("Ready", False, "StillLoading", "more")], "t2")
    flipped = merge_conditions(same, [condition("Ready", True, "Loaded")], "t3")
    assert [c.last_transition_time for c in (first[0], same[0], flipped[0])] == ["t1", "t1", "t3"]
    assert same[0].reason == "StillLoading"
    other = Condition(type="Accepted", status=ConditionStatus.TRUE)
    assert [c.type for c in merge_conditions([other], [], "t", owned={"Ready"})] == ["Accepted"]


def test_bmd_ready_with_counts_pods_and_selector() -> None:
    pods = [pod("a", ready(SQL), ready(CHAT)), pod("b", ready(SQL), ready(CHAT, state="failed", error="x"))]
    status = bmd_status(bmd(), {"sql": SQL, "chat": CHAT}, pods, BaseModelDeploymentStatus(), NOW)
    assert (status.phase, status.replicas, status.ready_replicas) == (BmdPhase.READY, 2, 2)
    assert status.adapters.model_dump() == {"desired": 2, "ready": 1, "failed": 1}
    assert [(p.name, p.adapters_loaded, p.engine_epoch) for p in status.pods] == [
        ("a", 2, "0@t"),
        ("b", 1, "0@t"),
    ]
    assert status.selector == "app.kubernetes.io/instance=gemma,app.kubernetes.io/name=loraplex-server"
    assert status.endpoint == "http://gemma.llm.svc:8080"
    assert status.observed_generation == 4
    assert find(status.conditions, "Progressing").status == ConditionStatus.FALSE  # failures are settled


def test_bmd_phases_from_pod_states() -> None:
    desired = {"sql": SQL}
    cases = [
        ([], BmdPhase.PENDING),
        ([PodObservation(name="a")], BmdPhase.PROVISIONING),
        ([pod("a", ready_=False)], BmdPhase.LOADING),
        ([pod("a", ready(SQL)), pod("b", ready_=False)], BmdPhase.DEGRADED),
        ([PodObservation(name="a", stuck="ImagePullBackOff: not found")], BmdPhase.FAILED),
    ]
    for pods, phase in cases:
        assert bmd_status(bmd(), desired, pods, BaseModelDeploymentStatus(), NOW).phase == phase, pods


def test_unschedulable_pods_raise_gpu_capacity_pending() -> None:
    waiting = PodObservation(name="a", unschedulable="0/2 nodes: insufficient nvidia.com/gpu")
    status = bmd_status(bmd(), {}, [waiting], BaseModelDeploymentStatus(), NOW)
    pending = find(status.conditions, "GPUCapacityPending")
    assert pending.status == ConditionStatus.TRUE and "nvidia.com/gpu" in pending.message
    scheduled = bmd_status(bmd(), {}, [pod("a")], status, NOW + 10)
    assert find(scheduled.conditions, "GPUCapacityPending") is None


def test_readiness_gate_opens_once_per_epoch() -> None:
    desired = {"sql": SQL, "chat": CHAT}
    loading = pod("a", ready(SQL))
    assert readiness_gate(loading, desired, None) == {
        "status": "False",
        "reason": "AdaptersLoading",
        "message": "engine epoch 0@t",
    }
    closed = readiness_gate(loading, desired, None)
    assert readiness_gate(loading, desired, closed) is None  # nothing to write
    settled = pod("a", ready(SQL), ready(CHAT, state="failed"))  # a failed adapter never holds the pod
    opened = readiness_gate(settled, desired, closed)
    assert opened["status"] == "True"
    more = {**desired, "new": DesiredAdapter(name="new", source="hf://org/new")}
    assert readiness_gate(settled, more, opened) is None  # hot-loading a new adapter keeps serving
    restarted = PodObservation(name="a", running=True, epoch="1@t2").with_reports([])
    assert readiness_gate(restarted, desired, opened)["status"] == "False"
    assert readiness_gate(PodObservation(name="a"), desired, opened) is None  # not running: kubelet decides


def test_backoff_survives_an_operator_restart_through_status() -> None:
    attempt = record_failure(None, "0@t", SQL, "rank too high", NOW - 5, error_type="rank_exceeds_max")
    written = lora_status(SQL, 1, [pod("a")], {"a": attempt}, LoraAdapterStatus(), NOW)
    stored = LoraAdapterStatus.model_validate(written.to_k8s())  # through the API server and back
    restored = attempts_from_status(SQL, stored, [pod("a")])
    assert restored == {("a", "sql"): attempt}
    assert stored.instances[0].error_type == "rank_exceeds_max"
    assert attempts_from_status(SQL, stored, [pod("b")]) == {}  # the pod is gone
