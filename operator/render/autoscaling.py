"""Autoscaling objects for `spec.autoscaling`: an HPA, or a KEDA ScaledObject, on a per-pod metric.

Both target the BaseModelDeployment itself through its scale subresource, never the Deployment:
the autoscaler writes `spec.replicas` of the BMD, the operator renders the Deployment from it,
so there is one source of replicas and a reconcile never fights the autoscaler.
"""

from __future__ import annotations

from typing import Any

from loraplex.operator.bmd import (
    KIND,
    AutoscalingProvider,
    AutoscalingSpec,
    BaseModelDeployment,
    ScalingMetric,
)
from loraplex.operator.common import API_VERSION
from loraplex.operator.render.meta import child_metadata

# autoscaling/v2 needs Kubernetes 1.23+; the local 1.20 control plane serves v2beta2 (same schema).
HPA_API_VERSIONS = ("autoscaling/v2", "autoscaling/v2beta2")
HPA_KIND = "HorizontalPodAutoscaler"
KEDA_API_VERSION = "keda.sh/v1alpha1"
KEDA_KIND = "ScaledObject"

# The engine's gauges on /metrics (vLLM names, so dashboards and adapter rules carry over).
PROMETHEUS_METRICS = {
    ScalingMetric.QUEUE_DEPTH: "vllm:num_requests_waiting",
    ScalingMetric.RUNNING_REQUESTS: "vllm:num_requests_running",
    ScalingMetric.KV_CACHE_USAGE: "vllm:kv_cache_usage_perc",
}


def hpa_metric_name(spec: AutoscalingSpec) -> str:
    """The name the custom-metrics API serves the metric under (adapters may rename it)."""
    return spec.metric_name or PROMETHEUS_METRICS[spec.metric]


def autoscaling_kinds(bmd: BaseModelDeployment) -> dict[str, bool]:
    """Which autoscaler kinds this spec wants (the others are deleted if present)."""
    autoscaling = bmd.spec.autoscaling
    provider = autoscaling.provider if autoscaling is not None else None
    return {HPA_KIND: provider == AutoscalingProvider.HPA, KEDA_KIND: provider == AutoscalingProvider.KEDA}


def _scale_target(bmd: BaseModelDeployment) -> dict[str, str]:
    return {"apiVersion": API_VERSION, "kind": KIND, "name": bmd.name}


def _scale_down(spec: AutoscalingSpec) -> dict[str, Any]:
    # One pod at a time: a removed replica takes its warm adapters and KV cache with it.
    return {
        "stabilizationWindowSeconds": spec.scale_down_stabilization_seconds,
        "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
    }


def build_hpa(bmd: BaseModelDeployment, api_version: str = HPA_API_VERSIONS[0]) -> dict[str, Any] | None:
    """A HorizontalPodAutoscaler on the per-pod average of the chosen engine gauge; None unless
    `spec.autoscaling` asks for the HPA provider."""
    spec = bmd.spec.autoscaling
    if spec is None or spec.provider != AutoscalingProvider.HPA:
        return None
    if api_version not in HPA_API_VERSIONS:
        raise ValueError(f"unsupported HPA apiVersion {api_version!r}")
    return {
        "apiVersion": api_version,
        "kind": HPA_KIND,
        "metadata": child_metadata(bmd, bmd.name),
        "spec": {
            "scaleTargetRef": _scale_target(bmd),
            "minReplicas": spec.min_replicas,
            "maxReplicas": spec.max_replicas,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": hpa_metric_name(spec)},
                        "target": {"type": "AverageValue", "averageValue": _quantity(spec.target)},
                    },
                }
            ],
            "behavior": {"scaleDown": _scale_down(spec)},
        },
    }


def prometheus_query(bmd: BaseModelDeployment, spec: AutoscalingSpec) -> str:
    """The sum over this base's pods; KEDA divides it by the replica count (AverageValue)."""
    name = PROMETHEUS_METRICS[spec.metric]
    # model_name is the served base name the server labels its gauges with.
    return f'sum({name}{{namespace="{bmd.namespace}",model_name="{bmd.served_name}"}})'


def build_scaled_object(bmd: BaseModelDeployment) -> dict[str, Any] | None:
    """A KEDA ScaledObject (prometheus trigger); None unless `spec.autoscaling` asks for KEDA."""
    spec = bmd.spec.autoscaling
    if spec is None or spec.provider != AutoscalingProvider.KEDA or spec.server_address is None:
        return None
    return {
        "apiVersion": KEDA_API_VERSION,
        "kind": KEDA_KIND,
        "metadata": child_metadata(bmd, bmd.name),
        "spec": {
            "scaleTargetRef": _scale_target(bmd),
            "minReplicaCount": spec.min_replicas,
            "maxReplicaCount": spec.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": _scale_down(spec)}}},
            "triggers": [
                {
                    "type": "prometheus",
                    "metricType": "AverageValue",
                    "metadata": {
                        "serverAddress": spec.server_address,
                        "query": prometheus_query(bmd, spec),
                        "threshold": f"{spec.target:g}",  # KEDA parses a float, not a quantity
                    },
                }
            ],
        },
    }


def _quantity(value: float) -> str:
    """A Kubernetes quantity: "4" for whole numbers, milli-units below that ("0.8" -> "800m")."""
    if float(value).is_integer():
        return str(int(value))
    return f"{round(value * 1000)}m"
