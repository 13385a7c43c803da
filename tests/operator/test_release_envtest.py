"""What the chart's uninstall hook runs (`loraplex operator release`), on a real API server:
the operator is scaled to zero, then no loraplex object keeps a finalizer that nobody releases."""

from __future__ import annotations

import uuid

import pytest
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import wait_until
from loraplex.operator.decide import FINALIZER
from loraplex.operator.release import release_finalizers, stop_operator

pytestmark = pytest.mark.envtest
GROUP, VERSION = "loraplex.dev", "v1alpha1"


def _body(kind: str, name: str, spec: dict) -> dict:
    finalizers = [FINALIZER, "loraplex.dev/finalizer", "example.com/someone-elses"]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": kind,
        "metadata": {"name": name, "finalizers": finalizers},
        "spec": spec,
    }


def test_release_stops_the_operator_and_leaves_nothing_stuck(local_cluster: LocalCluster, crds: None) -> None:
    namespace = f"release-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", namespace)
    with local_cluster.api_client() as api:
        custom, apps = client.CustomObjectsApi(api), client.AppsV1Api(api)
        labels = {"app": "op"}
        operator = {
            "metadata": {"name": "op"},
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": labels},
                "template": {
                    "metadata": {"labels": labels},
                    "spec": {"containers": [{"name": "o", "image": "x"}]},
                },
            },
        }
        apps.create_namespaced_deployment(namespace, operator)
        bmd = _body("BaseModelDeployment", "base", {"model": {"id": "m"}})
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "basemodeldeployments", bmd)
        for i in range(20):
            lora = _body(
                "LoraAdapter", f"a{i}", {"baseModel": {"name": "base"}, "source": {"uri": "hf://o/a"}}
            )
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "loraadapters", lora)
        stop_operator(api, namespace, "op")
        assert apps.read_namespaced_deployment("op", namespace).spec.replicas == 0
        assert release_finalizers(api, [namespace]) == 21
        local_cluster.kubectl("delete", "lora,bmd", "--all", "-n", namespace, "--wait=false")

        def finalizers_left() -> list[list[str]]:
            items = [
                item
                for plural in ("loraadapters", "basemodeldeployments")
                for item in custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)["items"]
            ]
            return [item["metadata"].get("finalizers") for item in items]

        # only someone else's finalizer is left: ours never hold a deletion without an operator
        assert wait_until(lambda: len(finalizers_left()) == 21, timeout=10)
        assert all(found == ["example.com/someone-elses"] for found in finalizers_left())
        assert release_finalizers(api, [namespace]) == 0  # idempotent
    local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
