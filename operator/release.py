"""`loraplex operator release`: let every loraplex object go without an operator.

The chart's pre-delete hook runs it on `helm uninstall`: first the operator is scaled to zero
(so it adds no finalizer back), then our finalizers are removed from every BaseModelDeployment
and LoraAdapter in scope. The objects stay (CRDs and custom objects outlive the chart); deleting
them later never hangs, and their children still go by owner reference. Adapters stay loaded
on pods that keep running — delete them before uninstalling to have them unloaded.

    loraplex operator release --all-namespaces --operator-deployment loraplex-system/loraplex-operator
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import kubernetes
from kubernetes.client import AppsV1Api, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.common import GROUP, VERSION
from loraplex.operator.decide import FINALIZER, LEGACY_FINALIZERS

OURS = frozenset({FINALIZER, *LEGACY_FINALIZERS})
WAIT_S = 120.0


def stop_operator(api: kubernetes.client.ApiClient, namespace: str, name: str) -> None:
    """Scale the operator to zero and wait until its pods are gone."""
    apps, core = AppsV1Api(api), CoreV1Api(api)
    try:
        deployment = apps.read_namespaced_deployment(name, namespace)
    except ApiException as error:
        if error.status == 404:
            return
        raise
    apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    selector = ",".join(f"{k}={v}" for k, v in (deployment.spec.selector.match_labels or {}).items())
    deadline = time.monotonic() + WAIT_S
    while core.list_namespaced_pod(namespace, label_selector=selector).items:
        if time.monotonic() > deadline:
            raise SystemExit(f"operator pods of {namespace}/{name} still running after {WAIT_S:.0f}s")
        time.sleep(1)


def objects(custom: CustomObjectsApi, namespaces: list[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    for plural in (lora_crd.PLURAL, bmd_crd.PLURAL):
        if namespaces:
            for namespace in namespaces:
                listed = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural)
                yield from ((plural, item) for item in listed["items"])
        else:
            listed = custom.list_cluster_custom_object(GROUP, VERSION, plural)
            yield from ((plural, item) for item in listed["items"])


def release_finalizers(api: kubernetes.client.ApiClient, namespaces: list[str]) -> int:
    """Remove our finalizers from every object in scope; the number of objects patched."""
    custom, released = CustomObjectsApi(api), 0
    for plural, item in objects(custom, namespaces):
        meta = item["metadata"]
        finalizers = meta.get("finalizers") or []
        kept = [name for name in finalizers if name not in OURS]
        if kept == finalizers:
            continue
        body = {"metadata": {"finalizers": kept, "resourceVersion": meta["resourceVersion"]}}
        try:
            custom.patch_namespaced_custom_object(
                GROUP, VERSION, meta["namespace"], plural, meta["name"], body
            )
            released += 1
        except ApiException as error:
            if error.status not in (404, 409):
                raise
            if error.status == 409:  # changed meanwhile: once more with the fresh object
                return released + release_finalizers(api, namespaces)
    return released


def release(namespaces: list[str], operator: str | None) -> str:
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    with kubernetes.client.ApiClient() as api:
        if operator:
            namespace, _, name = operator.partition("/")
            stop_operator(api, namespace, name)
        count = release_finalizers(api, namespaces)
    return f"released the finalizers of {count} object(s)"
