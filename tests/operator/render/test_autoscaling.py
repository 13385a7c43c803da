"""HPA and KEDA ScaledObject rendering for spec.autoscaling."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from loraplex.operator.render import RenderOptions, build_deployment, build_hpa, build_scaled_object
from loraplex.operator.render.autoscaling import autoscaling_kinds

SCALE_TARGET = {"apiVersion": "loraplex.dev/v1alpha1", "kind": "BaseModelDeployment", "name": "gemma"}


def test_no_autoscaler_without_autoscaling(bmd) -> None:
    assert build_hpa(bmd) is None
    assert build_scaled_object(bmd) is None
    assert autoscaling_kinds(bmd) == {"HorizontalPodAutoscaler": False, "ScaledObject": False}


def test_hpa_scales_the_bmd_on_the_per_pod_queue_depth(make_bmd) -> None:
    bmd = make_bmd(autoscaling={"minReplicas": 2, "maxReplicas": 6, "scaleDownStabilizationSeconds": 600})
    hpa = build_hpa(bmd)
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["kind"] == "HorizontalPodAutoscaler"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == SCALE_TARGET  # the scale subresource, not the Deployment
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    assert spec["metrics"] == [
        {
            "type": "Pods",
            "pods": {
                "metric": {"name": "vllm:num_requests_waiting"},
                "target": {"type": "AverageValue", "averageValue": "4"},
            },
        }
    ]
    assert spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 600
    owner = hpa["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == (
        "BaseModelDeployment",
        "gemma",
        "uid-1",
        True,
    )
    assert hpa["metadata"]["labels"]["loraplex.dev/base-model"] == "gemma"
    assert autoscaling_kinds(bmd) == {"HorizontalPodAutoscaler": True, "ScaledObject": False}
    assert build_scaled_object(bmd) is None


@pytest.mark.parametrize(
    ("metric", "target", "name", "value"),
    [
        ("runningRequests", 24, "vllm:num_requests_running", "24"),
        ("kvCacheUsage", 0.8, "vllm:kv_cache_usage_perc", "800m"),
    ],
)
def test_hpa_metric_table(make_bmd, metric, target, name, value) -> None:
    bmd = make_bmd(autoscaling={"maxReplicas": 3, "metric": metric, "target": target})
    pods = build_hpa(bmd)["spec"]["metrics"][0]["pods"]
    assert pods["metric"]["name"] == name
    assert pods["target"]["averageValue"] == value


def test_hpa_metric_name_as_the_adapter_serves_it(make_bmd) -> None:
    gke = "prometheus.googleapis.com|vllm:num_requests_waiting|gauge"
    bmd = make_bmd(autoscaling={"maxReplicas": 3, "metricName": gke})
    assert build_hpa(bmd)["spec"]["metrics"][0]["pods"]["metric"]["name"] == gke
    with pytest.raises(ValidationError):
        make_bmd(autoscaling={"maxReplicas": 3, "metricName": "prometheus.googleapis.com/vllm/gauge"})


def test_hpa_api_version_for_older_servers(make_bmd) -> None:
    bmd = make_bmd(autoscaling={"maxReplicas": 3})
    assert build_hpa(bmd, "autoscaling/v2beta2")["apiVersion"] == "autoscaling/v2beta2"
    with pytest.raises(ValueError, match="apiVersion"):
        build_hpa(bmd, "autoscaling/v1")


def test_keda_scaled_object_with_a_prometheus_trigger(make_bmd) -> None:
    address = "http://prometheus.monitoring.svc:9090"
    bmd = make_bmd(
        model={"id": "google/gemma-2-2b-it", "servedName": "gemma-2b"},
        autoscaling={"provider": "KEDA", "maxReplicas": 4, "target": 2.5, "serverAddress": address},
    )
    scaled = build_scaled_object(bmd)
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    spec = scaled["spec"]
    assert spec["scaleTargetRef"] == SCALE_TARGET
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (1, 4)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "AverageValue"
    assert trigger["metadata"] == {
        "serverAddress": address,
        "query": 'sum(vllm:num_requests_waiting{namespace="llm",model_name="gemma-2b"})',
        "threshold": "2.5",
    }
    assert scaled["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert build_hpa(bmd) is None  # KEDA makes its own HPA
    assert autoscaling_kinds(bmd) == {"HorizontalPodAutoscaler": False, "ScaledObject": True}


def test_keda_needs_a_server_address(make_bmd) -> None:
    with pytest.raises(ValidationError, match="serverAddress"):
        make_bmd(autoscaling={"provider": "KEDA", "maxReplicas": 4})


def test_deployment_replicas_follow_the_bmd_spec_under_autoscaling(make_bmd) -> None:
    """The autoscaler writes spec.replicas through the scale subresource; the Deployment follows."""
    bmd = make_bmd(replicas=3, autoscaling={"minReplicas": 1, "maxReplicas": 5})
    assert build_deployment(bmd, RenderOptions())["spec"]["replicas"] == 3


def test_scale_down_drain_fits_in_the_grace_period(bmd) -> None:
    """SIGTERM: /ready 503 while serving (delay), then in-flight requests (timeout), then engine stop."""
    pod = build_deployment(bmd, RenderOptions())["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    env = {item["name"]: item.get("value") for item in server["env"]}
    delay, timeout = float(env["SHUTDOWN_DELAY"]), float(env["SHUTDOWN_TIMEOUT"])
    assert delay > 0 and server["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert delay + timeout + 10 <= pod["terminationGracePeriodSeconds"]
    assert "lifecycle" not in server  # no preStop exec: the server drains itself
