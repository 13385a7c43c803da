"""The children of one base that `decide` plans (pure): what to server-side apply and which
unwanted kinds to delete, given what the API server serves (`Capabilities`, observed once).

The access Secret, credentials Secret and ConfigMap come first (the pods read them), then the
Deployment (left out while Autopilot would refuse its pods), Service, PDB, InferencePool and the
autoscaler (an HPA or a KEDA ScaledObject; the one not asked for is deleted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loraplex.operator import autopilot
from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.render import (
    RenderOptions,
    build_deployment,
    build_hpa,
    build_inference_pool,
    build_pdb,
    build_scaled_object,
    build_service,
)
from loraplex.operator.render.autoscaling import HPA_API_VERSIONS, HPA_KIND, KEDA_API_VERSION, KEDA_KIND
from loraplex.operator.render.network import INFERENCE_POOL_API_VERSION

Kind = tuple[str, str]  # (apiVersion, kind)
INFERENCE_POOL: Kind = (INFERENCE_POOL_API_VERSION, "InferencePool")
KEDA: Kind = (KEDA_API_VERSION, KEDA_KIND)
KEDA_MISSING = "autoscaling.provider KEDA, but KEDA's ScaledObject is not installed"


@dataclass(frozen=True)
class Capabilities:
    """What the API server serves, as far as rendering cares (looked up by `observe`)."""

    options: RenderOptions = field(default_factory=RenderOptions)
    hpa_api_version: str = HPA_API_VERSIONS[0]
    served: frozenset[Kind] = frozenset()  # optional kinds installed: InferencePool, KEDA


@dataclass(frozen=True)
class Children:
    apply: tuple[dict[str, Any], ...]
    delete: tuple[Kind, ...]  # same name as the base, in its namespace
    notes: tuple[str, ...] = ()


def workload_children(bmd: BaseModelDeployment, caps: Capabilities) -> Children:
    """Everything after the keys and ConfigMap."""
    apply: list[dict[str, Any]] = []
    if not autopilot.bmd_rejections(bmd):  # pods Autopilot refuses: status says AutopilotRejected
        apply.append(build_deployment(bmd, caps.options))
    apply += [build_service(bmd), build_pdb(bmd, caps.options)]
    delete: list[Kind] = []
    notes: list[str] = []
    if (pool := build_inference_pool(bmd)) is not None:
        apply.append(pool)
    elif INFERENCE_POOL in caps.served:
        delete.append(INFERENCE_POOL)
    hpa = build_hpa(bmd, caps.hpa_api_version)
    if hpa is not None:
        apply.append(hpa)
    else:
        delete.append((caps.hpa_api_version, HPA_KIND))
    scaled_object = build_scaled_object(bmd)
    if scaled_object is None:
        if KEDA in caps.served:
            delete.append(KEDA)
    elif KEDA in caps.served:
        apply.append(scaled_object)
    else:
        notes.append(KEDA_MISSING)
    return Children(tuple(apply), tuple(delete), tuple(notes))
