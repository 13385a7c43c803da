"""The operator's RBAC covers what it renders and touches, and nothing dangerous.

manifests/rbac/ is rendered from the Helm chart (`python manifests/generate.py`); tests/deploy
checks it is current and that the operator runs under it without a 403."""

from __future__ import annotations

from pathlib import Path

import yaml

from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.render import (
    RenderOptions,
    build_access_secret,
    build_configmap,
    build_deployment,
    build_hpa,
    build_inference_pool,
    build_pdb,
    build_scaled_object,
    build_service,
)

RBAC = Path(__file__).resolve().parents[2] / "manifests" / "rbac"
PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "ConfigMap": "configmaps",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "InferencePool": "inferencepools",
    "Secret": "secrets",
    "HorizontalPodAutoscaler": "horizontalpodautoscalers",
    "ScaledObject": "scaledobjects",
}
# Children the operator also deletes when the spec stops asking for them.
DELETED = {"InferencePool", "HorizontalPodAutoscaler", "ScaledObject"}


def _rules(name: str) -> list[dict]:
    documents = [doc for path in RBAC.glob("*.yaml") for doc in yaml.safe_load_all(path.read_text())]
    (role,) = [d for d in documents if d["kind"] == "ClusterRole" and d["metadata"]["name"] == name]
    return role["rules"]


def _allows(rules: list[dict], group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule["apiGroups"] and resource in rule["resources"] and verb in rule["verbs"]
        for rule in rules
    )


def _bmd(autoscaling: dict) -> BaseModelDeployment:
    body = {
        "metadata": {"name": "g", "namespace": "n", "uid": "u"},
        "spec": {
            "model": {"id": "m"},
            "routing": {"inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp"}}},
            "autoscaling": autoscaling,
        },
    }
    return BaseModelDeployment.from_body(body)


def test_operator_may_apply_every_rendered_child() -> None:
    bmd = _bmd({"maxReplicas": 3})
    keda = _bmd({"maxReplicas": 3, "provider": "KEDA", "serverAddress": "http://prometheus:9090"})
    children = [
        build_deployment(bmd, RenderOptions()),
        build_service(bmd),
        build_configmap(bmd, []),
        build_pdb(bmd, RenderOptions()),
        build_inference_pool(bmd),
        build_access_secret(bmd, "{}"),
        build_hpa(bmd),
        build_scaled_object(keda),
    ]
    assert set(PLURALS) == {child["kind"] for child in children}
    rules = _rules("loraplex-operator")
    for child in children:
        group = child["apiVersion"].rpartition("/")[0]
        verbs = ("get", "create", "patch", "delete") if child["kind"] in DELETED else ("create", "patch")
        for verb in verbs:
            assert _allows(rules, group, PLURALS[child["kind"]], verb), (child["kind"], verb)


def test_operator_touches_pods_status_and_secrets_narrowly() -> None:
    rules = _rules("loraplex-operator")
    assert _allows(rules, "", "pods/status", "patch")
    assert _allows(rules, "", "pods", "watch")
    assert _allows(rules, "loraplex.dev", "loraadapters/status", "patch")
    assert _allows(rules, "", "secrets", "get")
    assert not _allows(rules, "", "secrets", "list")
    assert not any(_allows(rules, "", "pods/exec", verb) for verb in ("create", "get"))
    assert not _allows(rules, "", "pods", "delete")
    for rule in rules:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_team_role_manages_adapters_only() -> None:
    rules = _rules("loraplex-adapter-editor")
    assert _allows(rules, "loraplex.dev", "loraadapters", "create")
    assert not _allows(rules, "loraplex.dev", "basemodeldeployments", "create")
    assert not _allows(rules, "loraplex.dev", "loraadapters/status", "patch")  # status is the operator's
