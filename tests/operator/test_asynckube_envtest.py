"""The async writer on a real API server: the credentials the `kubernetes` client loaded (TLS
against the local CA, bearer token) work for it; merge patches reach the status subresource,
JSON patches the finalizers (a failed `test` is a 422), and errors are the client's."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.operator.k8s import FIELD_MANAGER, Kube

pytestmark = pytest.mark.envtest
GROUP, VERSION, PLURAL = "loraplex.dev", "v1alpha1", "loraadapters"


def test_status_and_finalizer_patches(local_cluster: LocalCluster, crds: None) -> None:
    namespace = f"ak-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", namespace)
    api = local_cluster.api_client()
    custom = client.CustomObjectsApi(api)
    body = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraAdapter",
        "metadata": {"name": "sql"},
        "spec": {"baseModel": {"name": "tiny"}, "source": {"uri": "file:///tmp/sql"}},
    }
    custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
    kube = Kube(api)

    async def writes() -> list[int]:
        status = {"phase": "Ready", "readyReplicas": 2, "instances": [{"pod": "p0", "state": "Ready"}]}
        await asyncio.gather(*(kube.patch_status(PLURAL, namespace, "sql", status) for _ in range(3)))
        await kube.patch_metadata(
            PLURAL, namespace, "sql", [{"op": "add", "path": "/metadata/finalizers", "value": ["a/b"]}]
        )
        codes = []
        for name, ops in (
            ("sql", [{"op": "test", "path": "/metadata/finalizers", "value": ["x/y"]}]),
            ("absent", [{"op": "add", "path": "/metadata/finalizers", "value": ["a/b"]}]),
        ):
            try:
                await kube.patch_metadata(PLURAL, namespace, name, ops)
            except ApiException as error:
                codes.append(error.status)
        await kube.close()
        return codes

    assert asyncio.run(writes()) == [422, 404]
    stored = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "sql")
    assert stored["status"]["instances"] == [{"pod": "p0", "state": "Ready"}]
    assert stored["status"]["readyReplicas"] == 2
    assert stored["metadata"]["finalizers"] == ["a/b"]
    managers = {entry["manager"] for entry in stored["metadata"]["managedFields"]}
    assert FIELD_MANAGER in managers  # one manager of ours for status and finalizers
    stored["metadata"]["finalizers"] = []
    custom.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "sql", stored)
    local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
