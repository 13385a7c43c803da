"""GKE Autopilot's admission rules for the pods we render, as data, and a pure check.

Autopilot validates a pod against the compute class or hardware it asks for: a request below
the minimum is raised (the pod is changed), one above the maximum is refused, and some pod
features (privileged containers, host namespaces, writable hostPath) are refused outright.
`check(pod_template)` answers with every rule a pod breaks; the operator refuses to apply a
Deployment whose pods Autopilot would reject (`AutopilotRejected`) when
`spec.scheduling.autopilot` says the cluster is Autopilot.

Where the rules come from (`SOURCES`, read on `READ_ON` in stored copies of the GKE pages,
which hold each page's opening sections only):
- read there: a request below the minimum is raised and one above the maximum refused; GPU
  (Accelerator) pods get no default requests; other containers default to 1 GiB of ephemeral
  storage; Autopilot applies security constraints of its own (the security page's opening).
- not in the stored sections, written from the pages as recalled: the per-GPU table (allowed
  counts; CPU, memory, ephemeral-storage ranges), the general-purpose ranges and its 1:1-1:6.5
  vCPU:GiB window, the selectable node labels, and the forbidden features (privileged, host
  namespaces, hostPort, hostPath other than read-only /var/log). A test checks every GPU row
  against the Compute Engine machine it stands for (one L4 = up to g2-standard-32, 32 vCPU /
  128 GB, of which Autopilot leaves 31 vCPU / 115 GiB to the pod).
Re-read the pages before relying on a figure at an edge.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any

from kubernetes.utils import parse_quantity

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.common import Condition
from loraplex.operator.conditions import condition
from loraplex.operator.render.deployment import build_pod_template
from loraplex.operator.render.meta import RenderOptions

READ_ON = "2026-12-01"
SOURCES = {
    "resource-requests": "https://cloud.google.com/kubernetes-engine/docs/concepts/autopilot-resource-requests",
    "security": "https://docs.cloud.google.com/kubernetes-engine/docs/concepts/autopilot-security",
    "gpus": "https://cloud.google.com/kubernetes-engine/docs/how-to/autopilot-gpus",
}

GPU_RESOURCE = "nvidia.com/gpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
ACCELERATOR_COUNT_LABEL = "cloud.google.com/gke-accelerator-count"
SPOT_LABEL = "cloud.google.com/gke-spot"
COMPUTE_CLASS_LABEL = "cloud.google.com/compute-class"
# Node labels Autopilot lets a pod select on (anything else under these GKE prefixes is refused).
GKE_SELECTABLE_LABELS = frozenset(
    {
        ACCELERATOR_LABEL,
        ACCELERATOR_COUNT_LABEL,
        SPOT_LABEL,
        COMPUTE_CLASS_LABEL,
        "cloud.google.com/machine-family",
        "cloud.google.com/gke-ephemeral-storage-local-ssd",
        "cloud.google.com/gke-placement-group",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
    }
)
GKE_LABEL_PREFIXES = ("cloud.google.com/", "kubernetes.io/", "topology.kubernetes.io/", "node.kubernetes.io/")
# Built-in classes that never carry GPUs (a GPU pod takes Accelerator, or a custom ComputeClass).
CPU_ONLY_CLASSES = frozenset({"Balanced", "Scale-Out", "Performance", "autopilot", "autopilot-spot"})
HOST_PATH_READ_ONLY_PREFIX = "/var/log/"  # the one hostPath Autopilot admits, read-only

GI = Decimal(2**30)
MI = Decimal(2**20)


class Effect(StrEnum):
    REJECTED = "Rejected"  # Autopilot refuses the pod
    CHANGED = "Changed"  # Autopilot admits it after raising a request
    UNCHECKED = "Unchecked"  # hardware this table has no row for: not refused here, not vouched for


@dataclass(frozen=True)
class Range:
    low: Decimal
    high: Decimal


@dataclass(frozen=True)
class Shape:
    """What one pod may request on one hardware configuration (cores, bytes)."""

    cpu: Range
    memory: Range
    ephemeral_storage: Range


@dataclass(frozen=True)
class Violation:
    rule: str
    effect: Effect
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


def _shape(cpu_max: float, memory_max_gib: float, storage_max_gib: float = 122) -> Shape:
    return Shape(
        cpu=Range(Decimal("0.5"), Decimal(str(cpu_max))),
        memory=Range(GI, Decimal(str(memory_max_gib)) * GI),
        ephemeral_storage=Range(10 * MI, Decimal(str(storage_max_gib)) * GI),
    )


# Accelerator type -> GPU count -> allowed requests (Accelerator compute class, no CPU:memory
# ratio, no default requests). The counts are the only ones Autopilot provisions for the type.
ACCELERATORS: dict[str, dict[int, Shape]] = {
    "nvidia-l4": {1: _shape(31, 115), 2: _shape(23, 83), 4: _shape(47, 177), 8: _shape(95, 363)},
    "nvidia-tesla-t4": {1: _shape(46, 202), 2: _shape(46, 202), 4: _shape(94, 422)},
    "nvidia-tesla-a100": {
        1: _shape(11, 74),
        2: _shape(23, 148),
        4: _shape(47, 310),
        8: _shape(95, 635),
        16: _shape(95, 1270),
    },
    "nvidia-a100-80gb": {1: _shape(11, 148), 2: _shape(23, 310), 4: _shape(47, 635), 8: _shape(95, 1270)},
    "nvidia-h100-80gb": {
        1: _shape(25, 225),
        2: _shape(51, 450),
        4: _shape(103, 900),
        8: _shape(206, 1795, 5250),
    },
    "nvidia-h100-mega-80gb": {8: _shape(206, 1795, 5250)},
}

# The general-purpose class (pods without GPUs or a compute class): ranges and the memory per
# vCPU window (a request outside it has the other resource raised to fit).
GENERAL_PURPOSE = Shape(
    cpu=Range(Decimal("0.25"), Decimal(30)),
    memory=Range(GI / 2, 110 * GI),
    ephemeral_storage=Range(10 * MI, 122 * GI),
)
GENERAL_PURPOSE_GIB_PER_CPU = Range(Decimal(1), Decimal("6.5"))


def check(pod_template: Mapping[str, Any]) -> list[Violation]:
    """Every Autopilot rule the pod (a Pod or a pod template: `{metadata, spec}`) breaks.
    Empty means Autopilot admits it unchanged."""
    spec = pod_template.get("spec") or {}
    found = _security(spec) + _selectors(spec)
    accelerator = (spec.get("nodeSelector") or {}).get(ACCELERATOR_LABEL)
    requests = pod_requests(spec)
    if accelerator is None:
        return found + _general_purpose(spec, requests)
    return found + _accelerator(spec, accelerator, requests)


def rejections(pod_template: Mapping[str, Any]) -> list[Violation]:
    return [item for item in check(pod_template) if item.effect == Effect.REJECTED]


def pod_requests(spec: Mapping[str, Any]) -> dict[str, Decimal]:
    """Requests of the pod as the scheduler counts them: the sum over containers, or the largest
    init container where that is more. A limit without a request counts as the request."""

    def of(container: Mapping[str, Any]) -> dict[str, Decimal]:
        resources = container.get("resources") or {}
        merged = {**(resources.get("limits") or {}), **(resources.get("requests") or {})}
        return {key: Decimal(parse_quantity(value)) for key, value in merged.items()}

    total: dict[str, Decimal] = {}
    for container in spec.get("containers") or ():
        for key, value in of(container).items():
            total[key] = total.get(key, Decimal(0)) + value
    for container in spec.get("initContainers") or ():
        for key, value in of(container).items():
            total[key] = max(total.get(key, Decimal(0)), value)
    return total


def _security(spec: Mapping[str, Any]) -> list[Violation]:
    found = [
        Violation("host-namespaces", Effect.REJECTED, f"{key} is not allowed")
        for key in ("hostNetwork", "hostPID", "hostIPC")
        if spec.get(key)
    ]
    containers = [*(spec.get("initContainers") or ()), *(spec.get("containers") or ())]
    for container in containers:
        name = container.get("name", "?")
        if (container.get("securityContext") or {}).get("privileged"):
            found.append(Violation("privileged", Effect.REJECTED, f"container {name} is privileged"))
        if any(port.get("hostPort") for port in container.get("ports") or ()):
            found.append(Violation("host-port", Effect.REJECTED, f"container {name} uses a hostPort"))
    mounts = {m["name"]: m for c in containers for m in c.get("volumeMounts") or () if "name" in m}
    for volume in spec.get("volumes") or ():
        host_path = volume.get("hostPath")
        if host_path is None:
            continue
        mount = mounts.get(volume.get("name"), {})
        if not (host_path.get("path", "").startswith(HOST_PATH_READ_ONLY_PREFIX) and mount.get("readOnly")):
            found.append(
                Violation(
                    "host-path",
                    Effect.REJECTED,
                    f"hostPath {host_path.get('path')!r}: only read-only {HOST_PATH_READ_ONLY_PREFIX}* is allowed",
                )
            )
    return found


def _selectors(spec: Mapping[str, Any]) -> list[Violation]:
    selector = spec.get("nodeSelector") or {}
    tolerated = {item.get("key") for item in spec.get("tolerations") or ()}
    found = []
    for key, value in selector.items():
        if key.startswith(GKE_LABEL_PREFIXES) and key not in GKE_SELECTABLE_LABELS:
            found.append(
                Violation("node-selector", Effect.REJECTED, f"{key} is not a label Autopilot selects on")
            )
        elif not key.startswith(GKE_LABEL_PREFIXES) and key not in tolerated:
            # Workload separation: a custom label needs the matching toleration.
            found.append(
                Violation(
                    "node-selector", Effect.REJECTED, f"custom label {key}={value} without a toleration"
                )
            )
    if SPOT_LABEL in selector and selector[SPOT_LABEL] != "true":
        found.append(Violation("spot", Effect.REJECTED, f'{SPOT_LABEL} must be "true" when set'))
    compute_class = selector.get(COMPUTE_CLASS_LABEL)
    if compute_class in CPU_ONLY_CLASSES and ACCELERATOR_LABEL in selector:
        found.append(
            Violation("compute-class", Effect.REJECTED, f"compute class {compute_class} cannot carry GPUs")
        )
    return found


def _accelerator(
    spec: Mapping[str, Any], accelerator: str, requests: Mapping[str, Decimal]
) -> list[Violation]:
    shapes = ACCELERATORS.get(accelerator)
    if shapes is None:
        return [Violation("accelerator-type", Effect.UNCHECKED, f"{accelerator} has no row in this table")]
    count = int(requests.get(GPU_RESOURCE, 0))
    if count not in shapes:
        allowed = ", ".join(map(str, shapes))
        return [Violation("gpu-count", Effect.REJECTED, f"{count} x {accelerator}: allowed counts {allowed}")]
    wanted = (spec.get("nodeSelector") or {}).get(ACCELERATOR_COUNT_LABEL)
    found = []
    if wanted is not None and wanted != str(count):
        found.append(
            Violation("gpu-count", Effect.REJECTED, f"{ACCELERATOR_COUNT_LABEL}={wanted}, limit {count}")
        )
    return found + _ranges(f"{count} x {accelerator}", shapes[count], requests, "accelerator")


def _general_purpose(spec: Mapping[str, Any], requests: Mapping[str, Decimal]) -> list[Violation]:
    found = _ranges("general-purpose", GENERAL_PURPOSE, requests, "general-purpose")
    cpu, memory = requests.get("cpu"), requests.get("memory")
    if cpu and memory:
        per_cpu = memory / GI / cpu
        window = GENERAL_PURPOSE_GIB_PER_CPU
        if not window.low <= per_cpu <= window.high:
            found.append(
                Violation(
                    "general-purpose-ratio",
                    Effect.CHANGED,
                    f"{per_cpu:.2f} GiB per vCPU is outside {window.low}-{window.high}: one request is raised",
                )
            )
    return found


def _ranges(where: str, shape: Shape, requests: Mapping[str, Decimal], prefix: str) -> list[Violation]:
    found = []
    for resource, allowed in (
        ("cpu", shape.cpu),
        ("memory", shape.memory),
        ("ephemeral-storage", shape.ephemeral_storage),
    ):
        value = requests.get(resource)
        if value is None:  # Autopilot writes a default (or the minimum) into the pod
            found.append(
                Violation(f"{prefix}-{resource}-min", Effect.CHANGED, f"{where}: no {resource} request")
            )
            continue
        if value > allowed.high:
            message = f"{where}: {resource} request {_show(resource, value)} exceeds the maximum {_show(resource, allowed.high)}"
            found.append(Violation(f"{prefix}-{resource}-max", Effect.REJECTED, message))
        elif value < allowed.low:
            message = f"{where}: {resource} request {_show(resource, value)} is raised to {_show(resource, allowed.low)}"
            found.append(Violation(f"{prefix}-{resource}-min", Effect.CHANGED, message))
    return found


def _show(resource: str, value: Decimal) -> str:
    return f"{value.normalize():f}" if resource == "cpu" else f"{(value / GI).normalize():f}Gi"


def summary(violations: Sequence[Violation]) -> str:
    return "; ".join(map(str, violations))


CONDITION = "AutopilotRejected"


def bmd_rejections(bmd: BaseModelDeployment) -> list[Violation]:
    """What Autopilot would refuse in this base's pods; nothing unless `scheduling.autopilot`.
    The image is the only render option and no rule reads it, so the defaults do."""
    if not bmd.spec.scheduling.autopilot:
        return []
    return rejections(build_pod_template(bmd, RenderOptions()))


def rejected_condition(bmd: BaseModelDeployment) -> Condition | None:
    """`AutopilotRejected=True`, reason the first rule (CamelCase), message every rule broken."""
    found = bmd_rejections(bmd)
    if not found:
        return None
    reason = "".join(part.capitalize() for part in found[0].rule.split("-"))
    return condition(CONDITION, True, reason, summary(found), bmd.generation)
