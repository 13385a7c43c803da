"""spec.autoscaling against a real kube-apiserver (1.20: autoscaling/v2beta2, picked by discovery):
the HPA is accepted and targets the BMD's scale subresource, and `kubectl scale bmd` moves the
Deployment through spec.replicas (one source of replicas)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import wait_until
from loraplex.operator import crdgen

pytestmark = pytest.mark.envtest
GROUP, VERSION, PLURAL = "loraplex.dev", "v1alpha1", "basemodeldeployments"

BASE = """
apiVersion: loraplex.dev/v1alpha1
kind: BaseModelDeployment
metadata: {name: gemma}
spec:
  model: {id: google/gemma-2-2b-it}
  replicas: 1
  autoscaling: {minReplicas: 1, maxReplicas: 4, metric: runningRequests, target: 8,
                scaleDownStabilizationSeconds: 120}
"""


@pytest.fixture(scope="module")
def crds(local_cluster: LocalCluster) -> None:
    with local_cluster.api_client() as api:
        extensions = client.ApiextensionsV1Api(api)
        for crd in crdgen.all_crds(cel=False).values():  # 1.20 has no CEL
            local_cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))

            def established(name: str = crd["metadata"]["name"]) -> bool:
                conditions = extensions.read_custom_resource_definition(name).status.conditions or []
                return any(c.type == "Established" and c.status == "True" for c in conditions)

            assert wait_until(established, timeout=30)


@pytest.fixture
def namespace(local_cluster: LocalCluster, crds: None) -> Iterator[str]:
    name = f"hpa-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


def _operator(namespace: str) -> KopfRunner:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    return KopfRunner(args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"})


def _hpa(cluster: LocalCluster, namespace: str) -> dict | None:
    result = cluster.kubectl(
        "get", "horizontalpodautoscalers.v2beta2.autoscaling", "gemma", "-n", namespace, "-o", "json",
        check=False,
    )  # fmt: skip
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_hpa_targets_the_scale_subresource_and_kubectl_scale_moves_the_deployment(
    local_cluster: LocalCluster, namespace: str
) -> None:
    with local_cluster.api_client() as api, _operator(namespace) as runner:
        apps, objects = client.AppsV1Api(api), client.CustomObjectsApi(api)
        local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=BASE)
        assert wait_until(lambda: _hpa(local_cluster, namespace) is not None, timeout=60)
        hpa = _hpa(local_cluster, namespace)
        target = hpa["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "name": "gemma"}
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_running"
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
        assert hpa["metadata"]["ownerReferences"][0]["kind"] == "BaseModelDeployment"

        # What the HPA controller reads and writes: the BMD's scale subresource.
        scale = objects.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "gemma")
        assert scale["spec"]["replicas"] == 1

        def deployment_replicas() -> int | None:
            try:
                return apps.read_namespaced_deployment("gemma", namespace).spec.replicas
            except client.ApiException:
                return None

        assert wait_until(lambda: deployment_replicas() == 1, timeout=60)
        local_cluster.kubectl("scale", "bmd", "gemma", "-n", namespace, "--replicas=3")
        bmd = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gemma")
        assert bmd["spec"]["replicas"] == 3
        assert wait_until(lambda: deployment_replicas() == 3, timeout=60)
        local_cluster.kubectl("scale", "bmd", "gemma", "-n", namespace, "--replicas=1")
        assert wait_until(lambda: deployment_replicas() == 1, timeout=60)

        # Autoscaling off: the HPA goes, the replicas stay where they are.
        patch = {"spec": {"autoscaling": None}}
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gemma", patch)
        assert wait_until(lambda: _hpa(local_cluster, namespace) is None, timeout=60)
        assert deployment_replicas() == 1
    assert runner.exception is None
