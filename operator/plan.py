"""What `decide` returns and `act` carries out: plain values, no behaviour.

Every field is a complete instruction: `act` never looks back at what was observed, and a test
of `decide` reads the plan as the answer to "what would the operator do now, and why".
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.operator.reconcile import Action

Key = tuple[str, str]  # (namespace, name)
PodAdapter = tuple[str, str]  # (pod name, served name)


@dataclass(frozen=True)
class StatusPatch:
    plural: str
    namespace: str
    name: str
    status: dict[str, Any]  # only the keys we own; already known to differ from the stored one
    seen: dict[str, Any] | None = None  # the stored status it was compared with


@dataclass(frozen=True)
class MetaPatch:
    """One merge patch of a LoraAdapter's metadata: our finalizer and the attachment annotation."""

    namespace: str
    name: str
    finalizers: tuple[str, ...]  # the whole new list
    observed: tuple[str, ...] | None = None  # the list it replaces (None: there was none)
    annotations: dict[str, str] = field(default_factory=dict)
    has_annotations: bool = True  # whether the object has an annotations map to add to
    reason: str = ""  # why (for `explain`): "attach", "release", ...

    def json_patch(self) -> list[dict[str, Any]]:
        """A JSON patch that fails (422) if someone else changed the finalizers meanwhile, and
        does not care about other changes (our status writes move the resourceVersion)."""
        if self.observed is None:
            ops = [{"op": "add", "path": "/metadata/finalizers", "value": list(self.finalizers)}]
        else:
            ops = [
                {"op": "test", "path": "/metadata/finalizers", "value": list(self.observed)},
                {"op": "replace", "path": "/metadata/finalizers", "value": list(self.finalizers)},
            ]
        if self.annotations and not self.has_annotations:
            ops.append({"op": "add", "path": "/metadata/annotations", "value": dict(self.annotations)})
        else:
            for key, value in self.annotations.items():
                path = "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")
                ops.append({"op": "add", "path": path, "value": value})
        return ops


@dataclass(frozen=True)
class GatePatch:
    pod: str
    condition: dict[str, str]  # status, reason, message of the readiness-gate condition


@dataclass(frozen=True)
class Warning_:
    """A Kubernetes Warning event on an object (an adapter that turned Failed)."""

    body: dict[str, Any]
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """Everything one pass does for one base, in the order `act` runs it."""

    namespace: str = ""  # the base's: children, pods and gates live there
    base: str = ""  # the base's name (and that of its Deployment, Service, PDB, pool, autoscaler)
    children: tuple[dict[str, Any], ...] = ()  # server-side applied when their content changed
    deletes: tuple[tuple[str, str], ...] = ()  # (apiVersion, kind) of unwanted children, same name
    actions: dict[str, list[Action]] = field(default_factory=dict)  # per pod, in order
    bmd_status: StatusPatch | None = None  # written first: it carries the pod counts
    lora_statuses: tuple[StatusPatch, ...] = ()
    gates: tuple[GatePatch, ...] = ()
    meta: tuple[MetaPatch, ...] = ()
    warnings: tuple[Warning_, ...] = ()
    recheck_s: float | None = None  # look again this soon (a pod still loading something)
    notes: tuple[str, ...] = ()  # one line per fact `explain` should show

    @property
    def engine_calls(self) -> int:
        return sum(len(actions) for actions in self.actions.values())
