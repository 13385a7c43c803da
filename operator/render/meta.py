"""Names, labels, owner references and the template hash shared by every rendered child."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from loraplex.operator.bmd import KIND, BaseModelDeployment
from loraplex.operator.common import API_VERSION, GROUP
from loraplex.version import __version__

MANAGED_BY = "loraplex-operator"
BASE_MODEL_LABEL = f"{GROUP}/base-model"
TEMPLATE_HASH_ANNOTATION = f"{GROUP}/template-hash"
READINESS_GATE = f"{GROUP}/adapters-ready"


@dataclass(frozen=True)
class RenderOptions:
    """Operator-wide rendering settings (from the operator's own configuration, not the CR)."""

    default_image: str = f"ghcr.io/loraplex/server:{__version__}"  # images/server.Dockerfile
    # policy/v1 needs Kubernetes 1.21+; the local 1.20 control plane serves only policy/v1beta1.
    pdb_api_version: str = "policy/v1"


def configmap_name(bmd: BaseModelDeployment) -> str:
    return f"{bmd.name}-adapters"


def selector_labels(bmd: BaseModelDeployment) -> dict[str, str]:
    """The labels Service, PDB, InferencePool and status.selector select pods by. Never change
    these for an existing object: a Deployment's selector is immutable."""
    return {"app.kubernetes.io/name": "loraplex-server", "app.kubernetes.io/instance": bmd.name}


def labels(bmd: BaseModelDeployment) -> dict[str, str]:
    return {
        **selector_labels(bmd),
        "app.kubernetes.io/component": "inference-server",
        "app.kubernetes.io/part-of": "loraplex",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        BASE_MODEL_LABEL: bmd.name,
    }


def label_selector_string(bmd: BaseModelDeployment) -> str:
    """`status.selector` for the scale subresource (what an HPA reads)."""
    return ",".join(f"{key}={value}" for key, value in sorted(selector_labels(bmd).items()))


def owner_reference(bmd: BaseModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": bmd.name,
        "uid": bmd.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def child_metadata(bmd: BaseModelDeployment, name: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": bmd.namespace,
        "labels": labels(bmd),
        "ownerReferences": [owner_reference(bmd)],
    }


def content_hash(value: Any) -> str:
    """Short, stable digest of a JSON-able value (key order does not matter)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
