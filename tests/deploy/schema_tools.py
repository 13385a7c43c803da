"""Schema checks for every object we ship or render, against the Kubernetes releases GKE runs.

Core kinds go through `kubernetes-validate` in strict mode (its packaged OpenAPI schemas, no
network; an unknown field fails). Our own kinds go through the CRD's openAPIV3Schema (types,
enums, bounds, patterns) plus the unknown-field walk and the CRD's CEL rules. KEDA's
ScaledObject and the Gateway API Inference Extension's InferencePool are checked against the
field lists of their published APIs, written down below as facts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from functools import cache
from importlib.resources import files
from typing import Any

import jsonschema
from cel_tools import cel_errors, crd_schemas
from chart_tools import unknown_fields
from referencing import Registry, Resource

# GKE's release channels run 1.31 and later; kubernetes-validate 1.37 ships 1.25 to 1.37.
K8S_VERSIONS = ("1.31.0", "1.32.0", "1.33.0", "1.34.0", "1.35.0")

LEAF = None  # a scalar
FREE = "free-form"  # a map of any keys (labels, trigger metadata)

# HorizontalPodAutoscalerBehavior (autoscaling/v2), which KEDA embeds.
_HPA_RULES = {
    "stabilizationWindowSeconds": LEAF,
    "selectPolicy": LEAF,
    "tolerance": LEAF,
    "policies": [{"type": LEAF, "value": LEAF, "periodSeconds": LEAF}],
}
_HPA_BEHAVIOR = {"scaleUp": _HPA_RULES, "scaleDown": _HPA_RULES}

# keda.sh/v1alpha1 ScaledObject, from kedacore/keda apis/keda/v1alpha1/scaledobject_types.go
# (ScaledObjectSpec, AdvancedConfig, ScaleTarget, Fallback; commit 01ee1d30b296, read
# 2026-12-01) and scaletriggers_types.go (ScaleTriggers).
SCALED_OBJECT_SPEC = {
    "scaleTargetRef": {"name": LEAF, "apiVersion": LEAF, "kind": LEAF, "envSourceContainerName": LEAF},
    "pollingInterval": LEAF,
    "initialCooldownPeriod": LEAF,
    "cooldownPeriod": LEAF,
    "idleReplicaCount": LEAF,
    "minReplicaCount": LEAF,
    "maxReplicaCount": LEAF,
    "advanced": {
        "horizontalPodAutoscalerConfig": {"behavior": _HPA_BEHAVIOR, "name": LEAF},
        "restoreToOriginalReplicaCount": LEAF,
        "scalingModifiers": {"formula": LEAF, "target": LEAF, "activationTarget": LEAF, "metricType": LEAF},
    },
    "triggers": [
        {
            "type": LEAF,
            "name": LEAF,
            "useCachedMetrics": LEAF,
            "metadata": FREE,
            "authenticationRef": {"name": LEAF, "kind": LEAF},
            "metricType": LEAF,
        }
    ],
    "fallback": {"failureThreshold": LEAF, "replicas": LEAF, "behavior": LEAF},
}
SCALED_OBJECT_REQUIRED = {"spec": ("scaleTargetRef", "triggers"), "spec.scaleTargetRef": ("name",)}

# inference.networking.k8s.io/v1 InferencePool, from kubernetes-sigs/gateway-api-inference-extension
# api/v1/inferencepool_types.go (commit ca3d9dd43a88, read 2026-12-01): selector is their own
# LabelSelector (matchLabels only); endpointPickerRef.port is required when kind is Service.
INFERENCE_POOL_SPEC = {
    "selector": {"matchLabels": FREE},
    "targetPorts": [{"number": LEAF}],
    "endpointPickerRef": {
        "group": LEAF,
        "kind": LEAF,
        "name": LEAF,
        "port": {"number": LEAF},
        "failureMode": LEAF,
    },
}
INFERENCE_POOL_REQUIRED = {
    "spec": ("selector", "targetPorts", "endpointPickerRef"),
    "spec.endpointPickerRef": ("name",),
}
FOREIGN = {
    ("keda.sh/v1alpha1", "ScaledObject"): (SCALED_OBJECT_SPEC, SCALED_OBJECT_REQUIRED),
    ("inference.networking.k8s.io/v1", "InferencePool"): (INFERENCE_POOL_SPEC, INFERENCE_POOL_REQUIRED),
}
TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec", "status"}
OWN_GROUP = "loraplex.dev/"


def schema_errors(obj: Mapping[str, Any], version: str) -> list[str]:
    """Why `obj` would not be accepted as written by an API server of `version` (empty: fine)."""
    api_version, kind = obj.get("apiVersion", ""), obj.get("kind", "")
    if (api_version, kind) in FOREIGN:
        return foreign_errors(obj, *FOREIGN[(api_version, kind)])
    if api_version.startswith(OWN_GROUP):
        return own_errors(obj)
    try:
        validator = _core_validator(version, api_version, kind)
    except FileNotFoundError:
        return [f"{api_version} {kind}: no schema in Kubernetes {version}"]
    return [f"{kind} {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(dict(obj))]


@cache
def _core_validator(version: str, api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    """What `kubernetes_validate.validate(obj, version, strict=True)` builds, from the same
    packaged files, built once per kind instead of once per object (it re-reads the 1.3 MB
    definitions every call); a test checks that both give the same answers."""
    root = files("kubernetes_validate") / "kubernetes-json-schema" / f"v{version}-local-strict"
    group = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema = json.loads((root / f"{kind.lower()}-{group}.json").read_text())
    definitions = json.loads((root / "_definitions.json").read_text())
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def foreign_errors(
    obj: Mapping[str, Any], spec_fields: dict[str, Any], required: Mapping[str, tuple[str, ...]]
) -> list[str]:
    found = [f"unknown top-level field {key}" for key in obj if key not in TOP_LEVEL]
    found += _unknown(obj.get("spec") or {}, spec_fields, "spec")
    for path, keys in required.items():
        node: Any = obj
        for part in path.split("."):
            node = (node or {}).get(part) if isinstance(node, Mapping) else None
        found += [
            f"{path}.{key} is required" for key in keys if not isinstance(node, Mapping) or key not in node
        ]
    return found


def _unknown(value: Any, fields: Any, path: str) -> list[str]:
    if fields is LEAF or fields == FREE:
        return []
    if isinstance(fields, list):
        items = value if isinstance(value, list) else []
        return [e for i, item in enumerate(items) for e in _unknown(item, fields[0], f"{path}[{i}]")]
    if not isinstance(value, Mapping):
        return [f"{path}: expected an object"]
    found = []
    for key, item in value.items():
        if key not in fields:
            found.append(f"{path}.{key}")
        else:
            found += _unknown(item, fields[key], f"{path}.{key}")
    return found


@cache
def _own_validator(kind: str) -> jsonschema.Draft4Validator:
    # OpenAPI v3's boolean exclusiveMinimum is draft 4's.
    return jsonschema.Draft4Validator(crd_schemas()[kind])


def own_errors(obj: Mapping[str, Any]) -> list[str]:
    kind = obj.get("kind", "")
    if kind not in crd_schemas():
        return [f"{obj.get('apiVersion')} {kind}: not one of our kinds"]
    schema = crd_schemas()[kind]
    found = [
        f"{kind} {'.'.join(map(str, e.path))}: {e.message}" for e in _own_validator(kind).iter_errors(obj)
    ]
    found += [f"{kind} unknown field {path}" for path in unknown_fields(dict(obj), schema)]
    return found + cel_errors(kind, obj)
