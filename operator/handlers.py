"""kopf handlers: a thin registry. Each handler parses, calls the pure parts, and does I/O through
`Kube`; the per-base daemon (`daemon.py`) does the converging and writes status.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from loraplex.operator import autopilot
from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.access import read_salt, render_access_secret
from loraplex.operator.admission import ATTACHED_ANNOTATION, admit, base_key, desired_set, qualified_name
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentStatus, BmdPhase
from loraplex.operator.common import GROUP, VERSION
from loraplex.operator.conditions import condition, merge_conditions, timestamp
from loraplex.operator.credentials import render_credentials
from loraplex.operator.daemon import DaemonState, Wakers, World, converge_once
from loraplex.operator.engine_client import EngineClient, EngineClientError
from loraplex.operator.k8s import Kube
from loraplex.operator.lora import LoraAdapterStatus, LoraPhase
from loraplex.operator.pods import observe_pod
from loraplex.operator.render import (
    build_configmap,
    build_deployment,
    build_inference_pool,
    build_pdb,
    build_service,
)
from loraplex.operator.render.autoscaling import (
    HPA_API_VERSIONS,
    HPA_KIND,
    KEDA_API_VERSION,
    KEDA_KIND,
    build_hpa,
    build_scaled_object,
)
from loraplex.operator.render.meta import BASE_MODEL_LABEL, MANAGED_BY
from loraplex.operator.render.network import INFERENCE_POOL_API_VERSION
from loraplex.operator.settings import OperatorConfig

log = logging.getLogger(__name__)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base in annotations only: our status schema would prune `status.kopf`.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP)
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING  # Kubernetes events for warnings and errors only
    memo.config = OperatorConfig.from_env()
    memo.kube = Kube.from_environment()
    memo.wakers = Wakers()
    memo.daemon_states = {}  # (namespace, name) -> DaemonState, shared with the change handlers
    modern = await memo.kube.served("policy/v1", "PodDisruptionBudget")
    memo.options = memo.config.render_options("policy/v1" if modern else "policy/v1beta1")
    # autoscaling/v2 from 1.23 on; older servers (the local 1.20) serve the same schema as v2beta2.
    hpa_v2 = await memo.kube.served(HPA_API_VERSIONS[0], HPA_KIND)
    memo.hpa_api_version = HPA_API_VERSIONS[0] if hpa_v2 else HPA_API_VERSIONS[1]


# Indexes: the daemon reads them every cycle instead of listing from the API server.
@kopf.index("pods", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def server_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels.get(BASE_MODEL_LABEL, "")): _plain(body)}


@kopf.index(GROUP, VERSION, lora_crd.PLURAL)
def adapters_by_base(body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    key = base_key(body)
    return {key: _plain(body)} if key else None


@kopf.index("namespaces")
def namespace_labels(name: str, labels: Mapping[str, str], **_: Any) -> dict[str, dict[str, str]]:
    return {name: dict(labels)}


@kopf.on.event("namespaces")
def namespace_changed(name: str, memo: kopf.Memo, adapters_by_base: kopf.Index, **_: Any) -> None:
    """A relabelled namespace may be admitted or refused now: wake the bases its adapters attach to
    (the daemon re-admits from the `namespace_labels` index, which kopf updated first)."""
    for key, store in adapters_by_base.items():
        if any(body["metadata"]["namespace"] == name for body in store):
            memo.wakers.wake(key)


@kopf.on.event("pods", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def pod_changed(namespace: str, labels: Mapping[str, str], memo: kopf.Memo, **_: Any) -> None:
    memo.wakers.wake((namespace, labels.get(BASE_MODEL_LABEL, "")))


@kopf.on.create(GROUP, VERSION, bmd_crd.PLURAL)
@kopf.on.update(GROUP, VERSION, bmd_crd.PLURAL)
@kopf.on.resume(GROUP, VERSION, bmd_crd.PLURAL)
async def apply_children(
    body: kopf.Body, memo: kopf.Memo, adapters_by_base: kopf.Index, namespace_labels: kopf.Index, **_: Any
) -> None:
    """Render and server-side-apply the Deployment, Service, ConfigMap, PDB, InferencePool and
    autoscaler (HPA or KEDA ScaledObject)."""
    kube: Kube = memo.kube
    try:
        bmd = BaseModelDeployment.from_body(body)
    except ValidationError as error:
        await _report_invalid_spec(kube, body, str(error))
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    key = (bmd.namespace, bmd.name)
    adapters = list(adapters_by_base.get(key, []))
    verdicts = admit(bmd, adapters, _labels(namespace_labels))
    state = memo.daemon_states.get(key)
    salt = state.access_salt if state is not None and state.access_salt else await read_salt(kube, bmd)
    children = [
        await render_access_secret(kube, bmd, verdicts, adapters, salt),  # the pods mount it
        await render_credentials(kube, bmd, verdicts, adapters),  # the pods mount it too
        build_configmap(bmd, desired_set(verdicts).values()),  # first: the pods mount it
        build_deployment(bmd, memo.options),
        build_service(bmd),
        build_pdb(bmd, memo.options),
    ]
    if autopilot.bmd_rejections(bmd):  # pods Autopilot refuses: status says AutopilotRejected
        children = [child for child in children if child["kind"] != "Deployment"]
    for child in children:
        await kube.apply(child)
    pool = build_inference_pool(bmd)
    if pool is not None:
        await kube.apply(pool)
    elif await kube.served(INFERENCE_POOL_API_VERSION, "InferencePool"):
        await kube.delete(INFERENCE_POOL_API_VERSION, "InferencePool", bmd.namespace, bmd.name)
    if (state := memo.daemon_states.get(key)) is not None:
        state.configmap_hash = None  # we just wrote the ConfigMap: the daemon re-checks it
        state.access_hash = None
        state.credentials_hash = None
    memo.wakers.wake(key)
    await _apply_autoscaler(kube, bmd, memo.hpa_api_version)  # last: it may retry (KEDA missing)


async def _apply_autoscaler(kube: Kube, bmd: BaseModelDeployment, hpa_api_version: str) -> None:
    """The HPA or KEDA ScaledObject that spec.autoscaling asks for; an unwanted one is deleted."""
    hpa = build_hpa(bmd, hpa_api_version)
    if hpa is not None:
        await kube.apply(hpa)
    else:
        await kube.delete(hpa_api_version, HPA_KIND, bmd.namespace, bmd.name)
    scaled_object = build_scaled_object(bmd)
    if scaled_object is None:
        await kube.delete(KEDA_API_VERSION, KEDA_KIND, bmd.namespace, bmd.name)
    elif await kube.served(KEDA_API_VERSION, KEDA_KIND):
        await kube.apply(scaled_object)
    else:  # retried: KEDA may be installed later
        raise kopf.TemporaryError(
            "autoscaling.provider KEDA, but KEDA's ScaledObject is not installed", delay=60
        )


@kopf.daemon(GROUP, VERSION, bmd_crd.PLURAL, cancellation_timeout=10.0)
async def converge(
    stopped: kopf.DaemonStopped,
    body: kopf.Body,
    memo: kopf.Memo,
    server_pods: kopf.Index,
    adapters_by_base: kopf.Index,
    namespace_labels: kopf.Index,
    **_: Any,
) -> None:
    """Converge this base's pods until the object is deleted or the operator stops."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    state = memo.daemon_states.setdefault(key, DaemonState())
    engines = _EngineCache(memo.config)
    try:
        while not stopped:
            world = World(
                bmd_body=_plain(body),
                pods=list(server_pods.get(key, [])),
                adapters=list(adapters_by_base.get(key, [])),
                namespace_labels=_labels(namespace_labels),
            )
            acted = False
            try:
                engine = await engines.get(await _api_key(memo.kube, body))
                acted = await converge_once(memo.kube, engine, state, world, memo.config, memo.options)
            except (ValidationError, kopf.PermanentError):
                pass  # invalid spec: the change handler reported it; wait for a fix
            except Exception:  # one bad cycle must not end the daemon
                log.exception("cycle for %s/%s failed", *key)
            await memo.wakers.sleep(key, memo.config.quick_tick_s if acted else memo.config.tick_s)
    finally:
        memo.daemon_states.pop(key, None)
        await engines.close()


class _EngineCache:
    """One engine client per daemon, replaced when the deployment's API key changes."""

    def __init__(self, config: OperatorConfig) -> None:
        self._config = config
        self._key: str | None = None
        self._client: EngineClient | None = None

    async def get(self, api_key: str | None) -> EngineClient:
        if self._client is None or api_key != self._key:
            await self.close()
            self._key, self._client = api_key, EngineClient(self._config.timeouts, api_key).open()
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


@kopf.on.delete(GROUP, VERSION, bmd_crd.PLURAL, optional=True)
async def base_deleted(body: kopf.Body, memo: kopf.Memo, adapters_by_base: kopf.Index, **_: Any) -> None:
    """Children go by owner reference; attached adapters learn that their base is gone."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    for adapter in list(adapters_by_base.get(key, [])):
        try:
            await _refuse(
                memo.kube, adapter, "BaseModelNotFound", f"BaseModelDeployment {key[0]}/{key[1]} was deleted"
            )
        except ApiException as error:
            if error.status != 404:  # deleted together with its base: nothing left to tell
                raise


@kopf.on.create(GROUP, VERSION, lora_crd.PLURAL)
@kopf.on.update(GROUP, VERSION, lora_crd.PLURAL)
@kopf.on.resume(GROUP, VERSION, lora_crd.PLURAL)
async def adapter_changed(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Record the attachment and wake the base's daemon; it admits, loads and reports."""
    key = base_key(body)
    kube: Kube = memo.kube
    if key is None or await kube.get(bmd_crd.PLURAL, *key) is None:
        await _refuse(
            kube, body, "BaseModelNotFound", f"no BaseModelDeployment {key[0]}/{key[1]}" if key else ""
        )
        return
    meta = body["metadata"]
    if ATTACHED_ANNOTATION not in (meta.get("annotations") or {}):
        await kube.patch_annotations(
            lora_crd.PLURAL, meta["namespace"], meta["name"], {ATTACHED_ANNOTATION: "/".join(key)}
        )
    memo.wakers.wake(key)


def _unloads_on_delete(spec: Mapping[str, Any], **_: Any) -> bool:
    return spec.get("deletionPolicy", "Unload") == "Unload"


@kopf.on.delete(GROUP, VERSION, lora_crd.PLURAL, when=_unloads_on_delete)
async def adapter_deleted(body: kopf.Body, memo: kopf.Memo, server_pods: kopf.Index, **_: Any) -> None:
    """Unload policy: hold the finalizer until no pod of the base serves the adapter any more."""
    key = base_key(body)
    base = await memo.kube.get(bmd_crd.PLURAL, *key) if key else None
    if key is None or base is None or not _condition_true(body, "Accepted"):
        return  # no base, or never loaded under this object: nothing to wait for
    memo.wakers.wake(key)  # the daemon now sees it as Deleting and unloads it
    spec = body.get("spec") or {}
    meta = body["metadata"]
    # its bare served name, or the qualified one it is served under after a cross-namespace clash
    names = {spec.get("servedName") or meta["name"], qualified_name(meta["namespace"], meta["name"])}
    served = (frozenset(names), spec.get("source", {}).get("uri"))
    api_key = await _api_key(memo.kube, base)
    holders = await _pods_serving(memo, list(server_pods.get(key, [])), served, api_key)
    if holders:
        raise kopf.TemporaryError(f"still loaded on {', '.join(holders)}", delay=3)


async def _pods_serving(
    memo: kopf.Memo,
    pod_bodies: list[Mapping[str, Any]],
    served: tuple[frozenset[str], str | None],
    api_key: str | None,
) -> list[str]:
    """Pods that list this adapter (served name and source: another adapter may take the name next)."""
    holders = []
    async with EngineClient(memo.config.timeouts, api_key) as engine:
        for pod in map(observe_pod, pod_bodies):
            if pod.url is None:
                continue
            try:
                if any(
                    report.name in served[0] and report.source == served[1]
                    for report in await engine.list_adapters(pod.url)
                ):
                    holders.append(pod.name)
            except EngineClientError:
                continue  # a pod that does not answer restarts from the ConfigMap, without it
    return holders


async def _report_invalid_spec(kube: Kube, body: Mapping[str, Any], message: str) -> None:
    meta = body["metadata"]
    old = BaseModelDeploymentStatus.model_validate(body.get("status") or {})
    invalid = condition("Ready", False, "InvalidSpec", message, meta.get("generation"))
    conditions = merge_conditions(old.conditions, [invalid], timestamp(time.time()))
    status = {"phase": BmdPhase.FAILED.value, "conditions": [item.to_k8s() for item in conditions]}
    await kube.patch_status(bmd_crd.PLURAL, meta["namespace"], meta["name"], status)


async def _refuse(kube: Kube, body: Mapping[str, Any], reason: str, message: str) -> None:
    meta = body["metadata"]
    old = LoraAdapterStatus.model_validate(body.get("status") or {})
    refused = condition("Accepted", False, reason, message, meta.get("generation"))
    status = {
        "observedGeneration": meta.get("generation"),
        "phase": LoraPhase.PENDING.value,
        "conditions": [
            c.to_k8s() for c in merge_conditions(old.conditions, [refused], timestamp(time.time()))
        ],
    }
    await kube.patch_status(lora_crd.PLURAL, meta["namespace"], meta["name"], status)


async def _api_key(kube: Kube, body: Mapping[str, Any]) -> str | None:
    ref = (body.get("spec") or {}).get("apiKeySecretRef")
    if not ref:
        return None
    return await kube.read_secret_key(body["metadata"]["namespace"], ref["name"], ref["key"])


def _condition_true(body: Mapping[str, Any], condition_type: str) -> bool:
    conditions = (body.get("status") or {}).get("conditions") or ()
    return any(item.get("type") == condition_type and item.get("status") == "True" for item in conditions)


def _labels(index: kopf.Index) -> dict[str, dict[str, str]]:
    return {name: next(iter(store), {}) for name, store in index.items()}


def _plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot of a kopf body as plain dicts (kopf's views follow the live object)."""
    return {key: (_plain(value) if isinstance(value, Mapping) else value) for key, value in body.items()}
