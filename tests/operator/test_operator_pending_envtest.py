"""The operator against a real kube-apiserver + controller-manager with no pod runner: pods stay
Pending, so this checks rendering, admission and status wiring (the pods' side is in
test_operator_envtest.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import wait_until

pytestmark = pytest.mark.envtest
GROUP, VERSION = "loraplex.dev", "v1alpha1"


@pytest.fixture
def namespace(local_cluster: LocalCluster, crds: None) -> Iterator[str]:
    name = f"op-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def objects(local_cluster: LocalCluster) -> Iterator[client.CustomObjectsApi]:
    with local_cluster.api_client() as api:
        yield client.CustomObjectsApi(api)


def _apply(cluster: LocalCluster, namespace: str, manifest: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def _get(objects: client.CustomObjectsApi, namespace: str, plural: str, name: str) -> dict[str, Any]:
    return objects.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)


def _condition(body: dict[str, Any], condition_type: str) -> dict[str, Any]:
    conditions = body.get("status", {}).get("conditions", [])
    return next((item for item in conditions if item["type"] == condition_type), {})


def _operator(namespace: str) -> KopfRunner:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    return KopfRunner(args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"})


BASE = """
apiVersion: loraplex.dev/v1alpha1
kind: BaseModelDeployment
metadata: {name: gemma}
spec:
  model: {id: google/gemma-2-2b-it}
  replicas: 2
"""
ADAPTERS = """
apiVersion: loraplex.dev/v1alpha1
kind: LoraAdapter
metadata: {name: sql}
spec: {baseModel: {name: gemma}, source: {uri: hf://org/sql}}
---
apiVersion: loraplex.dev/v1alpha1
kind: LoraAdapter
metadata: {name: keep}
spec: {baseModel: {name: gemma}, source: {uri: hf://org/keep}, deletionPolicy: Orphan}
---
apiVersion: loraplex.dev/v1alpha1
kind: LoraAdapter
metadata: {name: lost}
spec: {baseModel: {name: missing}, source: {uri: hf://org/lost}}
"""


def test_operator_renders_admits_and_reports(
    local_cluster: LocalCluster, namespace: str, objects: client.CustomObjectsApi
) -> None:
    with local_cluster.api_client() as api, _operator(namespace) as runner:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        _apply(local_cluster, namespace, BASE)
        _apply(local_cluster, namespace, ADAPTERS)

        def phase(plural: str, name: str) -> str | None:
            return _get(objects, namespace, plural, name).get("status", {}).get("phase")

        assert wait_until(lambda: phase("basemodeldeployments", "gemma") == "Provisioning", timeout=30)
        deployment = apps.read_namespaced_deployment("gemma", namespace)
        assert deployment.metadata.owner_references[0].kind == "BaseModelDeployment"
        assert core.read_namespaced_service("gemma", namespace).spec.ports[0].port == 8080
        assert wait_until(lambda: len(core.list_namespaced_pod(namespace).items) == 2, timeout=30)

        def configmap_names() -> list[str]:
            text = core.read_namespaced_config_map("gemma-adapters", namespace).data["adapters.json"]
            return [entry["name"] for entry in yaml.safe_load(text)]

        assert wait_until(lambda: configmap_names() == ["keep", "sql"], timeout=30), configmap_names()
        assert wait_until(
            lambda: _condition(_get(objects, namespace, "loraadapters", "sql"), "Accepted"), timeout=30
        )
        sql = _get(objects, namespace, "loraadapters", "sql")
        assert _condition(sql, "Accepted")["status"] == "True"
        assert sql["status"]["desiredReplicas"] == 2 and sql["status"]["phase"] == "Pending"
        assert (
            _condition(_get(objects, namespace, "loraadapters", "lost"), "Accepted")["reason"]
            == "BaseModelNotFound"
        )

        bmd = _get(objects, namespace, "basemodeldeployments", "gemma")
        assert (
            bmd["status"]["selector"]
            == "app.kubernetes.io/instance=gemma,app.kubernetes.io/name=loraplex-server"
        )
        assert bmd["status"]["adapters"]["desired"] == 2

        local_cluster.kubectl("scale", "-n", namespace, "bmd/gemma", "--replicas=3")
        assert wait_until(
            lambda: apps.read_namespaced_deployment("gemma", namespace).spec.replicas == 3, timeout=30
        )

        patch = '{"spec": {"baseModel": {"name": "other"}}}'
        local_cluster.kubectl("patch", "-n", namespace, "lora/sql", "--type=merge", "-p", patch)
        assert wait_until(
            lambda: (
                _condition(_get(objects, namespace, "loraadapters", "sql"), "Accepted").get("reason")
                == "BaseModelImmutable"
            ),
            timeout=30,
        )
        assert wait_until(lambda: configmap_names() == ["keep"], timeout=30)

        def warnings() -> set[str]:
            events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=sql").items
            return {event.reason for event in events if event.type == "Warning"}

        assert wait_until(lambda: "BaseModelImmutable" in warnings(), timeout=30), warnings()

        # The base goes: its adapters say so, and an Unload adapter then deletes without waiting.
        local_cluster.kubectl("delete", "-n", namespace, "bmd/gemma")

        def sql_reason() -> str | None:
            return _condition(_get(objects, namespace, "loraadapters", "sql"), "Accepted").get("reason")

        assert wait_until(lambda: sql_reason() == "BaseModelNotFound", timeout=30), sql_reason()
        local_cluster.kubectl("delete", "-n", namespace, "lora/sql", "--timeout=30s")
    assert runner.exception is None, runner.output

    # Operator stopped: an Orphan adapter still deletes at once (no finalizer deadlock).
    assert "finalizers" not in _get(objects, namespace, "loraadapters", "keep")["metadata"]
    local_cluster.kubectl("delete", "-n", namespace, "lora/keep", "--timeout=10s")


def test_rules_the_old_api_server_cannot_check_become_conditions(
    local_cluster: LocalCluster, namespace: str, objects: client.CustomObjectsApi
) -> None:
    bad = BASE.replace("replicas: 2", "replicas: 2\n  autoscaling: {minReplicas: 3, maxReplicas: 2}")
    with _operator(namespace) as runner:
        _apply(local_cluster, namespace, bad)  # 1.20 has no CEL: the API server takes it

        def ready_reason() -> str | None:
            return _condition(_get(objects, namespace, "basemodeldeployments", "gemma"), "Ready").get(
                "reason"
            )

        assert wait_until(lambda: ready_reason() == "InvalidSpec", timeout=30), ready_reason()
        bmd = _get(objects, namespace, "basemodeldeployments", "gemma")
        assert bmd["status"]["phase"] == "Failed"
        assert "minReplicas" in _condition(bmd, "Ready")["message"]
    assert runner.exception is None, runner.output
