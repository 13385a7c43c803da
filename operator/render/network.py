"""How traffic reaches the pods: the Service and the optional Gateway API InferencePool."""

from __future__ import annotations

from typing import Any

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.render.meta import child_metadata, selector_labels

CONTAINER_PORT = 8080
PORT_NAME = "http"
INFERENCE_POOL_API_VERSION = "inference.networking.k8s.io/v1"


def build_service(bmd: BaseModelDeployment) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(bmd, bmd.name),
        "spec": {
            "type": bmd.spec.service.type.value,
            "selector": selector_labels(bmd),
            "ports": [
                {
                    "name": PORT_NAME,
                    "port": bmd.spec.service.port,
                    "targetPort": PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def service_endpoint(bmd: BaseModelDeployment) -> str:
    """In-cluster URL clients use (status.endpoint)."""
    return f"http://{bmd.name}.{bmd.namespace}.svc:{bmd.spec.service.port}"


def build_inference_pool(bmd: BaseModelDeployment) -> dict[str, Any] | None:
    """An InferencePool over the pods, for an existing inference gateway; None when not enabled."""
    pool = bmd.spec.routing.inference_pool
    if not pool.enabled or pool.endpoint_picker_ref is None:
        return None
    picker = pool.endpoint_picker_ref
    return {
        "apiVersion": INFERENCE_POOL_API_VERSION,
        "kind": "InferencePool",
        "metadata": child_metadata(bmd, bmd.name),
        "spec": {
            "selector": {"matchLabels": selector_labels(bmd)},
            "targetPorts": [{"number": CONTAINER_PORT}],
            "endpointPickerRef": {
                "group": picker.group or "",
                "kind": picker.kind,
                "name": picker.name,
                "port": {"number": picker.port},
                "failureMode": picker.failure_mode.value,
            },
        },
    }
