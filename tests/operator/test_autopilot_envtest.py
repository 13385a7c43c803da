"""The operator against a real kube-apiserver: a BaseModelDeployment whose pods Autopilot would
refuse gets AutopilotRejected (with the rule) and no Deployment; once fixed, the Deployment comes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import wait_until

pytestmark = pytest.mark.envtest

BASE = """
apiVersion: loraplex.dev/v1alpha1
kind: BaseModelDeployment
metadata: {name: gemma}
spec:
  model: {id: google/gemma-2-2b-it}
  accelerator: {type: nvidia-l4, count: 1}
  resources: {cpu: "48", memory: 16Gi, ephemeralStorage: 50Gi}
  scheduling: {autopilot: true}
"""


@pytest.fixture
def namespace(local_cluster: LocalCluster, crds: None) -> Iterator[str]:
    name = f"ap-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


def _rejected(objects: client.CustomObjectsApi, namespace: str) -> dict[str, Any] | None:
    body = objects.get_namespaced_custom_object(
        "loraplex.dev", "v1alpha1", namespace, "basemodeldeployments", "gemma"
    )
    conditions = body.get("status", {}).get("conditions", [])
    return next((item for item in conditions if item["type"] == "AutopilotRejected"), None)


def _has_deployment(apps: client.AppsV1Api, namespace: str) -> bool:
    try:
        apps.read_namespaced_deployment("gemma", namespace)
    except ApiException as error:
        if error.status == 404:
            return False
        raise
    return True


def test_a_pod_autopilot_refuses_is_reported_not_deployed(
    local_cluster: LocalCluster, namespace: str
) -> None:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    with (
        local_cluster.api_client() as api,
        KopfRunner(args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"}) as runner,
    ):
        objects, apps, core = client.CustomObjectsApi(api), client.AppsV1Api(api), client.CoreV1Api(api)
        local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=BASE)
        assert wait_until(lambda: _rejected(objects, namespace) is not None, timeout=30)
        rejected = _rejected(objects, namespace)
        assert rejected["status"] == "True" and rejected["reason"] == "AcceleratorCpuMax"
        assert rejected["message"].startswith("accelerator-cpu-max: 1 x nvidia-l4: cpu request 48")
        # the children are applied off the pass, so the Service may land just after the status
        assert wait_until(lambda: _service_port(core, namespace) == 8080, timeout=30)
        assert not _has_deployment(apps, namespace)

        patch = '{"spec": {"resources": {"cpu": "4"}}}'
        local_cluster.kubectl("patch", "-n", namespace, "bmd/gemma", "--type=merge", "-p", patch)
        assert wait_until(lambda: _has_deployment(apps, namespace), timeout=30)
        assert wait_until(lambda: _rejected(objects, namespace) is None, timeout=30)
        local_cluster.kubectl("delete", "-n", namespace, "bmd/gemma", "--timeout=30s")
    assert runner.exception is None, runner.output


def _service_port(core, namespace: str) -> int | None:
    try:
        return core.read_namespaced_service("gemma", namespace).spec.ports[0].port
    except ApiException as error:
        if error.status == 404:
            return None
        raise
