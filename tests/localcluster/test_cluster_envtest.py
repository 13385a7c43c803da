"""The local control plane is a real Kubernetes API: CRDs, kopf, controllers, garbage collection."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import pid_alive, wait_until

pytestmark = pytest.mark.envtest

GROUP, VERSION, PLURAL = "envtest.loraplex.dev", "v1", "widgets"
WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": f"{PLURAL}.{GROUP}"},
    "spec": {
        "group": GROUP,
        "scope": "Namespaced",
        "names": {"plural": PLURAL, "singular": "widget", "kind": "Widget"},
        "versions": [
            {
                "name": VERSION,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                            "status": {
                                "type": "object",
                                "properties": {"doubled": {"type": "integer"}, "phase": {"type": "string"}},
                            },
                        },
                    }
                },
            }
        ],
    },
}
DEPLOYMENT = {
    "apiVersion": "apps/v1",
    "kind": "Deployment",
    "metadata": {"name": "web"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "example.invalid/web:1"}]},
        },
    },
}


@pytest.fixture(scope="module")
def widget_crd(local_cluster: LocalCluster) -> str:
    local_cluster.kubectl("apply", "-f", "-", input=json.dumps(WIDGET_CRD))
    name = WIDGET_CRD["metadata"]["name"]
    local_cluster.kubectl("wait", "--for=condition=Established", f"crd/{name}", "--timeout=30s")
    return name


@pytest.fixture
def namespace(local_cluster: LocalCluster) -> Iterator[str]:
    name = f"t-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def api(local_cluster: LocalCluster) -> Iterator[client.ApiClient]:
    with local_cluster.api_client() as api_client:
        yield api_client


def _widget(name: str, size: int) -> str:
    return json.dumps(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"size": size},
        }
    )


def test_custom_resource_applied_with_kubectl_reads_back_through_the_client(
    local_cluster: LocalCluster, widget_crd: str, namespace: str, api: client.ApiClient
) -> None:
    local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_widget("w1", 3))
    widget = client.CustomObjectsApi(api).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "w1"
    )
    assert widget["spec"] == {"size": 3}
    assert widget["metadata"]["uid"]


def test_kopf_handler_patches_status(
    local_cluster: LocalCluster, widget_crd: str, namespace: str, api: client.ApiClient
) -> None:
    from kopf.testing import KopfRunner

    objects = client.CustomObjectsApi(api)
    operator = str(Path(__file__).with_name("widget_operator.py"))
    with KopfRunner(["run", "--standalone", "--namespace", namespace, operator], timeout=60) as runner:
        local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=_widget("w2", 21))

        def doubled() -> object:
            return (
                objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w2")
                .get("status", {})
                .get("doubled")
            )

        assert wait_until(lambda: doubled() == 42, timeout=30), f"status never patched: {doubled()!r}"
    assert runner.exception is None
    assert runner.exit_code == 0


def test_deployment_becomes_replicaset_and_pods_and_deletion_collects_them(
    local_cluster: LocalCluster, namespace: str, api: client.ApiClient
) -> None:
    apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
    local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(DEPLOYMENT))

    def owned_pods() -> list[client.V1Pod]:
        return core.list_namespaced_pod(namespace, label_selector="app=web").items

    assert wait_until(lambda: len(owned_pods()) == 2, timeout=30), "the controllers made no pods"
    (replica_set,) = apps.list_namespaced_replica_set(namespace).items
    assert replica_set.metadata.owner_references[0].kind == "Deployment"
    assert {p.metadata.owner_references[0].name for p in owned_pods()} == {replica_set.metadata.name}
    # No scheduler, no kubelet: the pods exist but nothing runs them.
    assert {p.status.phase for p in owned_pods()} == {"Pending"}

    apps.delete_namespaced_deployment("web", namespace, propagation_policy="Background")
    assert wait_until(
        lambda: not apps.list_namespaced_replica_set(namespace).items and not owned_pods(), timeout=30
    ), "the garbage collector left children of the deleted Deployment"


def test_teardown_leaves_no_process_and_no_files() -> None:
    with LocalCluster.start(with_controllers=False) as cluster:
        assert (
            cluster.kubectl("get", "namespace", "default", "-o", "name").stdout.strip() == "namespace/default"
        )
        pids, workdir = cluster.pids, cluster.workdir
        assert all(pid_alive(pid) for pid in pids.values())
    assert set(pids) == {"etcd", "kube-apiserver"}
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not workdir.exists()
