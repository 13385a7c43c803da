"""Both resources' status, computed from what the pods reported (never from our own bookkeeping).

The one place that says whether an adapter is Ready on a pod (`instance`): the pod reports it
ready in the wanted version and the pod itself is Ready, i.e. serving through the Service.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from loraplex.operator import autopilot
from loraplex.operator.bmd import (
    AdapterCounts,
    BaseModelDeployment,
    BaseModelDeploymentStatus,
    BmdPhase,
    PodReport,
)
from loraplex.operator.common import Condition
from loraplex.operator.conditions import condition, merge_conditions, parse_timestamp, timestamp
from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport, AdapterState
from loraplex.operator.lora import (
    AdapterInstance,
    InstanceState,
    LoraAdapterStatus,
    LoraPhase,
    ResolvedAdapter,
    TokenUsage,
)
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import Attempt, matches
from loraplex.operator.render import label_selector_string, service_endpoint

# Engine error_type -> LoraAdapter condition type; the engine's own text becomes the message.
FAILURE_CONDITIONS = {
    "rank_exceeds_max": "RankExceedsBase",
    "base_model_mismatch": "BaseModelMismatch",
    "conflict": "NameConflict",
    "source": "SourceUnavailable",
    "adapter_download": "SourceUnavailable",
    "adapter_not_found": "SourceUnavailable",
    "integrity": "SourceUnavailable",
    "validation": "InvalidAdapter",
    "unknown_target_module": "InvalidAdapter",
    "shape_mismatch": "InvalidAdapter",
    "corrupt_file": "InvalidAdapter",
    "unsupported": "InvalidAdapter",
    "too_large": "InvalidAdapter",
    "capacity": "InsufficientCapacity",
}
DEFAULT_FAILURE = "LoadFailed"
NOT_SERVING = "loaded; the pod is not Ready (not in the Service's endpoints)"
LORA_OWNED = frozenset({"Loaded", "Ready", DEFAULT_FAILURE, *FAILURE_CONDITIONS.values()})
BMD_OWNED = frozenset({"Available", "Ready", "Progressing", "GPUCapacityPending", autopilot.CONDITION})


def live_pods(pods: Sequence[PodObservation]) -> list[PodObservation]:
    return sorted((pod for pod in pods if not pod.terminating), key=lambda pod: pod.name)


def _report(pod: PodObservation, name: str) -> AdapterReport | None:
    return pod.reports_by_name.get(name)


def instance(
    adapter: DesiredAdapter, pod: PodObservation, attempt: Attempt | None, now: float
) -> AdapterInstance:
    """The adapter on one pod. A refused load the pod did not keep shows as Failed from our record."""
    attempt = attempt if attempt is not None and attempt.applies_to(pod.epoch, adapter) else None
    report = _report(pod, adapter.name)
    error_type = None
    if not pod.reachable:
        state, error = InstanceState.PENDING, pod.stuck or pod.error
    elif report is None:
        state = InstanceState.FAILED if attempt else InstanceState.PENDING
        error, error_type = (attempt.last_error, attempt.error_type) if attempt else (None, None)
    elif report.state == AdapterState.READY and not matches(adapter, report):
        state, error = InstanceState.LOADING, None  # an older version: being replaced
    elif report.state == AdapterState.READY:
        # Ready only where clients reach it: the pod holds it and serves (Ready, so in the
        # Service's EndpointSlices); base and adapter counts never contradict each other.
        state = InstanceState.READY if pod.ready else InstanceState.PENDING
        error = None if pod.ready else NOT_SERVING
    elif report.state == AdapterState.FAILED:
        state, error, error_type = InstanceState.FAILED, report.error, report.error_type
        if attempt is not None:
            error, error_type = error or attempt.last_error, error_type or attempt.error_type
    else:
        state, error = InstanceState.LOADING, None
    return AdapterInstance(
        pod=pod.name,
        state=state,
        loaded_at=timestamp(report.loaded_at) if report and report.loaded_at else None,
        attempts=attempt.attempts if attempt else 0,
        last_error=error,
        error_type=error_type,
        next_attempt_at=timestamp(attempt.next_attempt_at)
        if attempt and attempt.next_attempt_at > now
        else None,
    )


def attempts_from_status(
    adapter: DesiredAdapter, status: LoraAdapterStatus, pods: Sequence[PodObservation]
) -> dict[tuple[str, str], Attempt]:
    """Backoff records as a restarted operator finds them in status (assumes the same engine epoch:
    a pod that restarted meanwhile is retried at once anyway, its epoch differs)."""
    epochs = {pod.name: pod.epoch for pod in pods}
    return {
        (item.pod, adapter.name): Attempt(
            epoch=epochs.get(item.pod),
            adapter=adapter,
            attempts=item.attempts,
            next_attempt_at=parse_timestamp(item.next_attempt_at) if item.next_attempt_at else 0.0,
            last_error=item.last_error,
            error_type=item.error_type,
        )
        for item in status.instances
        if item.state == InstanceState.FAILED and item.attempts > 0 and item.pod in epochs
    }


def lora_phase(instances: Sequence[AdapterInstance]) -> LoraPhase:
    states = [item.state for item in instances]
    ready = states.count(InstanceState.READY)
    if all(state == InstanceState.PENDING for state in states):  # no pod runs yet (or none at all)
        return LoraPhase.PENDING
    if ready == len(states):
        return LoraPhase.READY
    if ready:
        return LoraPhase.PARTIALLY_READY
    if InstanceState.FAILED in states and InstanceState.LOADING not in states:
        return LoraPhase.FAILED
    return LoraPhase.LOADING


def lora_status(
    adapter: DesiredAdapter,
    generation: int,
    pods: Sequence[PodObservation],
    attempts: Mapping[str, Attempt],
    old: LoraAdapterStatus,
    now: float,
) -> LoraAdapterStatus:
    """`attempts` by pod name. Conditions other writers own (Accepted) are carried over."""
    live = live_pods(pods)
    instances = [instance(adapter, pod, attempts.get(pod.name), now) for pod in live]
    phase = lora_phase(instances)
    ready = sum(item.state == InstanceState.READY for item in instances)
    conditions = [
        condition(
            "Loaded", ready > 0, "Loaded" if ready else phase.value, f"{ready}/{len(live)} pods", generation
        ),
        condition(
            "Ready", phase == LoraPhase.READY, _ready_reason(phase), f"{ready}/{len(live)} pods", generation
        ),
        *_failure_conditions(adapter, live, attempts, generation),
    ]
    return LoraAdapterStatus(
        observed_generation=generation,
        phase=phase,
        conditions=merge_conditions(old.conditions, conditions, timestamp(now), LORA_OWNED),
        served_name=adapter.name,
        resolved=_resolved(adapter, live) or old.resolved,
        desired_replicas=len(live),
        ready_replicas=ready,
        instances=instances,
        tokens=_tokens(adapter, live) or old.tokens,
    )


def _tokens(adapter: DesiredAdapter, pods: Sequence[PodObservation]) -> TokenUsage | None:
    """Tokens served, summed over the pods that report the adapter (each counts since it started);
    None when no pod answered, so an unreachable cycle keeps the last summary."""
    reports = [report for pod in pods if (report := _report(pod, adapter.name)) is not None]
    if not reports:
        return None
    return TokenUsage(
        prompt=sum(report.prompt_tokens for report in reports),
        generated=sum(report.generated_tokens for report in reports),
    )


def _ready_reason(phase: LoraPhase) -> str:
    return {LoraPhase.READY: "AllReplicasLoaded", LoraPhase.PENDING: "NoPods"}.get(phase, phase.value)


def _failure_conditions(
    adapter: DesiredAdapter, pods: Sequence[PodObservation], attempts: Mapping[str, Attempt], generation: int
) -> list[Condition]:
    """One condition per kind of failure, carrying the engine's text and the pods it came from."""
    failures: dict[str, tuple[str, str, list[str]]] = {}
    for pod in pods:
        report, attempt = _report(pod, adapter.name), attempts.get(pod.name)
        if report is not None and report.state == AdapterState.FAILED:
            error_type, message = report.error_type or "adapter_load_failed", report.error or "load failed"
        elif report is None and pod.reachable and attempt and attempt.applies_to(pod.epoch, adapter):
            error_type, message = (
                attempt.error_type or "adapter_load_failed",
                attempt.last_error or "load failed",
            )
        else:
            continue
        kind = FAILURE_CONDITIONS.get(error_type, DEFAULT_FAILURE)
        failures.setdefault(kind, (error_type, message, []))[2].append(pod.name)
    return [
        condition(kind, True, _camel(error_type), f"{message} (pods: {', '.join(names)})", generation)
        for kind, (error_type, message, names) in sorted(failures.items())
    ]


def _camel(error_type: str) -> str:
    return "".join(part.capitalize() for part in error_type.split("_")) or "Unknown"


def _resolved(adapter: DesiredAdapter, pods: Sequence[PodObservation]) -> ResolvedAdapter | None:
    for pod in pods:
        report = _report(pod, adapter.name)
        if report is not None and report.state == AdapterState.READY and matches(adapter, report):
            return ResolvedAdapter(
                revision=report.resolved_revision or report.revision,
                sha256=report.sha256,
                size_bytes=report.size_bytes,
                rank=report.rank,
                alpha=report.alpha,
                target_modules=list(report.target_modules),
            )
    return None


def bmd_status(
    bmd: BaseModelDeployment,
    desired: Mapping[str, DesiredAdapter],
    pods: Sequence[PodObservation],
    old: BaseModelDeploymentStatus,
    now: float,
) -> BaseModelDeploymentStatus:
    live = live_pods(pods)
    ready_pods = sum(pod.ready for pod in live)
    states = {
        name: [instance(adapter, pod, None, now).state for pod in live] for name, adapter in desired.items()
    }
    counts = AdapterCounts(
        desired=len(desired),
        ready=sum(bool(found) and all(s == InstanceState.READY for s in found) for found in states.values()),
        failed=sum(InstanceState.FAILED in found for found in states.values()),
    )
    phase, message = bmd_phase(bmd, live, ready_pods)
    return BaseModelDeploymentStatus(
        observed_generation=bmd.generation,
        phase=phase,
        conditions=merge_conditions(
            old.conditions,
            _bmd_conditions(bmd, live, ready_pods, counts, phase, message),
            timestamp(now),
            BMD_OWNED,
        ),
        replicas=len(live),
        ready_replicas=ready_pods,
        selector=label_selector_string(bmd),
        endpoint=service_endpoint(bmd),
        adapters=counts,
        pods=[_pod_report(pod, desired) for pod in live],
    )


def bmd_phase(
    bmd: BaseModelDeployment, live: Sequence[PodObservation], ready_pods: int
) -> tuple[BmdPhase, str]:
    """Phase and a one-line why. Failed only for states that need a human (crash loop, bad image)."""
    wanted = bmd.spec.replicas
    stuck = [f"{pod.name}: {pod.stuck}" for pod in live if pod.stuck]
    if stuck and ready_pods == 0:
        return BmdPhase.FAILED, "; ".join(stuck)
    if wanted == 0:
        return BmdPhase.PENDING, "scaled to zero"
    if ready_pods >= wanted:
        return BmdPhase.READY, f"{ready_pods}/{wanted} pods ready"
    if ready_pods > 0:
        return BmdPhase.DEGRADED, f"{ready_pods}/{wanted} pods ready"
    if any(pod.running for pod in live):
        return BmdPhase.LOADING, "loading the model and adapters"
    if live:
        return BmdPhase.PROVISIONING, "waiting for pods to be scheduled and started"
    return BmdPhase.PENDING, "no pods yet"


def _bmd_conditions(
    bmd: BaseModelDeployment,
    live: Sequence[PodObservation],
    ready_pods: int,
    counts: AdapterCounts,
    phase: BmdPhase,
    message: str,
) -> list[Condition]:
    generation = bmd.generation
    unschedulable = sorted({pod.unschedulable for pod in live if pod.unschedulable})
    converged = phase == BmdPhase.READY and counts.ready + counts.failed == counts.desired
    conditions = [
        condition(
            "Available", ready_pods > 0, "PodsReady" if ready_pods else "NoReadyPods", message, generation
        ),
        condition("Ready", phase == BmdPhase.READY, phase.value, message, generation),
        condition(
            "Progressing",
            not converged,
            "Converged" if converged else phase.value,
            f"adapters ready {counts.ready}/{counts.desired}, failed {counts.failed}",
            generation,
        ),
    ]
    if unschedulable:
        conditions.append(
            condition("GPUCapacityPending", True, "Unschedulable", "; ".join(unschedulable), generation)
        )
    if (rejected := autopilot.rejected_condition(bmd)) is not None:
        conditions.append(rejected)  # the Deployment is not applied: see children.workload_children
    return conditions


def _pod_report(pod: PodObservation, desired: Mapping[str, DesiredAdapter]) -> PodReport:
    loaded = sum(
        1
        for report in pod.reports or ()
        if report.state == AdapterState.READY
        and report.name in desired
        and matches(desired[report.name], report)
    )
    return PodReport(
        name=pod.name, ip=pod.ip, ready=pod.ready, engine_epoch=pod.epoch, adapters_loaded=loaded
    )
