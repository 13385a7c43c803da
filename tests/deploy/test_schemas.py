"""Every object we produce, valid for Kubernetes 1.31 through 1.35 as written: what the operator
renders for a matrix of specs, every chart template under each values set, every file in
manifests/ and every complete object in the docs' YAML blocks. Strict: an unknown field fails
(a newer API server would prune or refuse it). See schema_tools for what checks which kind."""

from __future__ import annotations

import copy
import re
from typing import Any

import kubernetes_validate
import pytest
import test_chart
import yaml
from chart_tools import CHART, MANIFESTS, ROOT, documents, helm
from schema_tools import K8S_VERSIONS, schema_errors

from loraplex.operator import autopilot
from loraplex.operator.access import access_document
from loraplex.operator.admission import admit, desired_set
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

NAMESPACE = "llm"
L4 = {"accelerator": {"type": "nvidia-l4", "count": 1}, "resources": {"cpu": "4", "memory": "16Gi"}}
KEDA = {"maxReplicas": 4, "provider": "KEDA", "serverAddress": "http://prometheus.monitoring:9090"}
SPECS: dict[str, dict[str, Any]] = {
    "cpu": {},
    "l4": L4,
    "a100": {
        "accelerator": {"type": "nvidia-tesla-a100", "count": 1},  # one device per pod (bmd.py)
        "resources": {"ephemeralStorage": "100Gi"},
    },
    "h100": {"accelerator": {"type": "nvidia-h100-80gb", "count": 1}, "engine": {"cudaGraphs": False}},
    "spot": {**L4, "scheduling": {"spot": True, "autopilot": True}},
    "compute-class": {
        **L4,
        "scheduling": {
            "computeClass": "l4-spot-first",
            "tolerations": [{"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}],
            "priorityClassName": "inference",
        },
    },
    "hpa": {
        **L4,
        "autoscaling": {"minReplicas": 1, "maxReplicas": 8, "target": 0.8, "metric": "kvCacheUsage"},
    },
    "keda": {**L4, "autoscaling": KEDA},
    "inference-pool": {
        **L4,
        "routing": {
            "inferencePool": {"enabled": True, "endpointPickerRef": {"name": "gemma-epp", "port": 9002}}
        },
    },
    "multi-team": {
        **L4,
        "adapterNamespaces": {
            "from": "Selector",
            "selector": {"matchLabels": {"loraplex.dev/tenant": "yes"}},
        },
        "apiKeySecretRef": {"name": "api-key", "key": "key"},
        "hfTokenSecretRef": {"name": "hf-token", "key": "token"},
        "serviceAccountName": "gcs-reader",
        "service": {"type": "LoadBalancer", "port": 80},
    },
}
ADAPTERS = [
    {"name": "sql", "namespace": NAMESPACE, "spec": {"source": {"uri": "hf://org/sql"}, "aliases": ["q"]}},
    {
        "name": "support",
        "namespace": "team-a",
        "spec": {
            "baseModel": {"name": "gemma", "namespace": NAMESPACE},
            "source": {"uri": "gs://bucket/support", "credentialsSecretRef": {"name": "gcs"}},
            "access": {"apiKeySecretRefs": [{"name": "team-a-keys", "key": "key"}]},
            "pinned": True,
            "deletionPolicy": "Orphan",
        },
    },
]


def _body(spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": "BaseModelDeployment",
        "metadata": {"name": "gemma", "namespace": NAMESPACE, "uid": "u-1", "generation": 1},
        "spec": {"model": {"id": "google/gemma-2-2b-it", "dtype": "bfloat16"}, **spec},
    }


def _adapters() -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "loraplex.dev/v1alpha1",
            "kind": "LoraAdapter",
            "metadata": {"name": item["name"], "namespace": item["namespace"], "creationTimestamp": f"t{i}"},
            "spec": {"baseModel": {"name": "gemma"}, **item["spec"]},
        }
        for i, item in enumerate(ADAPTERS)
    ]


def rendered(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Everything the operator applies for this spec, plus the custom objects themselves."""
    body = _body(spec)
    bmd = BaseModelDeployment.from_body(body)
    adapters = _adapters()
    verdicts = admit(bmd, adapters, {"team-a": {"loraplex.dev/tenant": "yes"}, NAMESPACE: {}})
    desired = desired_set(verdicts)
    document = access_document(
        b"\0" * 16, {"team-a/support": ["k1"]}, [n for n in desired if "support" not in n]
    )
    children = [
        build_access_secret(bmd, document),
        build_configmap(bmd, desired.values()),
        build_deployment(bmd, RenderOptions()),
        build_service(bmd),
        build_pdb(bmd, RenderOptions()),
        build_inference_pool(bmd),
        build_hpa(bmd),
        build_scaled_object(bmd),
    ]
    for adapter in adapters:
        adapter["metadata"].pop("creationTimestamp")
    body["metadata"] = {"name": "gemma", "namespace": NAMESPACE}
    return [child for child in children if child is not None] + [body, *adapters]


def _without_empty(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if doc]


def chart_documents() -> dict[str, list[dict[str, Any]]]:
    """`helm template --include-crds` under each values set the chart's tests document."""
    found = {}
    for name, values in test_chart.VALUE_SETS.items():
        sets = [arg for value in values for arg in ("--set", value)]
        text = helm("template", "loraplex", str(CHART), "--include-crds", *sets).stdout
        found[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return found


def manifest_documents() -> dict[str, list[dict[str, Any]]]:
    return {str(path.relative_to(ROOT)): documents(path) for path in sorted(MANIFESTS.rglob("*.yaml"))}


# Kinds in the docs that no packaged schema or fact list here covers, and why.
UNCHECKED = {("monitoring.googleapis.com/v1", "PodMonitoring"): "GKE Managed Prometheus CRD, not ours"}


def docs_documents() -> dict[str, list[dict[str, Any]]]:
    found = {}
    for path in sorted((ROOT / "docs").rglob("*.md")):
        blocks = re.findall(r"^ *```ya?ml\n(.*?)^ *```", path.read_text(), flags=re.S | re.M)
        docs = [doc for block in blocks for doc in yaml.safe_load_all(_dedent(block)) if doc]
        objects = [doc for doc in docs if isinstance(doc, dict) and "apiVersion" in doc and "kind" in doc]
        if objects:
            found[str(path.relative_to(ROOT))] = objects
    return found


def _dedent(block: str) -> str:
    lines = block.splitlines()
    indent = min((len(line) - len(line.lstrip()) for line in lines if line.strip()), default=0)
    return "\n".join(line[indent:] for line in lines)


def _checked(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [doc for doc in docs if (doc["apiVersion"], doc["kind"]) not in UNCHECKED]


def _errors(docs: list[dict[str, Any]], version: str) -> list[str]:
    return [
        f"{d['kind']}/{d['metadata'].get('name')}: {e}"
        for d in _checked(docs)
        for e in schema_errors(d, version)
    ]


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", SPECS)
def test_rendered_objects_are_valid(name: str, version: str) -> None:
    assert _errors(rendered(SPECS[name]), version) == []


@pytest.mark.parametrize("name", SPECS)
def test_every_rendered_pod_is_admitted_by_autopilot_unchanged(name: str) -> None:
    (deployment,) = [doc for doc in rendered(SPECS[name]) if doc["kind"] == "Deployment"]
    assert autopilot.check(deployment["spec"]["template"]) == []


def test_the_matrix_renders_every_kind_it_claims() -> None:
    kinds = {doc["kind"] for spec in SPECS.values() for doc in rendered(spec)}
    assert kinds == {
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "InferencePool",
        "HorizontalPodAutoscaler",
        "ScaledObject",
        "BaseModelDeployment",
        "LoraAdapter",
    }


@pytest.fixture(scope="module")
def chart() -> dict[str, list[dict[str, Any]]]:
    return chart_documents()


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_chart_templates_are_valid(chart: dict[str, list[dict[str, Any]]], version: str) -> None:
    for name, docs in chart.items():
        assert _errors(docs, version) == [], name
    assert any(doc["kind"] == "CustomResourceDefinition" for doc in chart["defaults"])


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_are_valid(version: str) -> None:
    files = manifest_documents()
    assert {"manifests/install.yaml", "manifests/gke-autopilot/gemma-2-2b-it.yaml"} <= set(files)
    for path, docs in files.items():
        assert _errors(docs, version) == [], path


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_docs_yaml_blocks_are_valid(version: str) -> None:
    files = docs_documents()
    assert "docs/gke-autopilot.md" in files
    for path, docs in files.items():
        assert _errors(docs, version) == [], path
    seen = {(d["apiVersion"], d["kind"]) for docs in files.values() for d in docs}
    assert seen & set(UNCHECKED) == set(UNCHECKED), "drop kinds from UNCHECKED that the docs no longer show"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_crds_are_valid_apiextensions_v1(version: str) -> None:
    crds = [doc for path in sorted((ROOT / "crds").glob("*.yaml")) for doc in documents(path)]
    assert len(crds) == 2 and {doc["apiVersion"] for doc in crds} == {"apiextensions.k8s.io/v1"}
    assert _errors(crds, version) == []


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_cached_validators_answer_as_kubernetes_validate(version: str) -> None:
    deployment = _deployment()
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["resources"]["limitz"] = {}
    assert kubernetes_validate.validate(deployment, version, strict=True) == version.rsplit(".", 1)[0]
    with pytest.raises(kubernetes_validate.ValidationError, match="limitz"):
        kubernetes_validate.validate(wrong, version, strict=True)
    assert schema_errors(deployment, version) == []
    assert any("limitz" in error for error in schema_errors(wrong, version))


def _deployment() -> dict[str, Any]:
    (deployment,) = [doc for doc in rendered(SPECS["l4"]) if doc["kind"] == "Deployment"]
    return deployment


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_a_wrong_field_fails_the_matrix(version: str) -> None:
    """The same checks refuse a misspelt field anywhere: deep in a pod template, in an old API
    version GKE no longer serves, in a CRD, in a foreign kind and in our own kind."""
    deployment = _deployment()
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    assert schema_errors(deployment, version) == []
    assert any("imagePullPolicyy" in error for error in schema_errors(wrong, version))
    pdb = build_pdb(BaseModelDeployment.from_body(_body({})), RenderOptions("x", "policy/v1beta1"))
    assert schema_errors(pdb, version) != []  # policy/v1beta1 is gone since 1.25
    crd = documents(ROOT / "crds" / "loraadapters.loraplex.dev.yaml")[0]
    crd["spec"]["versions"][0]["subresource"] = {"status": {}}
    assert schema_errors(crd, version) != []
    (pool,) = [doc for doc in rendered(SPECS["inference-pool"]) if doc["kind"] == "InferencePool"]
    pool["spec"]["endpointPickerRef"]["portNumber"] = 9002  # an older draft's field name
    assert schema_errors(pool, version) == ["spec.endpointPickerRef.portNumber"]
    (scaled,) = [doc for doc in rendered(SPECS["keda"]) if doc["kind"] == "ScaledObject"]
    del scaled["spec"]["triggers"]
    assert schema_errors(scaled, version) == ["spec.triggers is required"]
    bmd = _body({"replica": 2})
    assert any("replica" in error for error in schema_errors(bmd, version))
    bmd = _body({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}})
    assert any("must not exceed" in error for error in schema_errors(bmd, version))  # its CEL rule
