"""kopf handlers: a thin registry that parses, indexes, wakes and refuses. Each base's loop
(`daemon.py`: observe → decide → act) does the converging and writes status.

LoraAdapters have no kopf change handlers: an event only wakes their base (no progress or
diff-base annotations written per object); the base's loop manages their finalizer itself.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.act import BaseState
from loraplex.operator.admission import base_key
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentStatus, BmdPhase
from loraplex.operator.common import GROUP, VERSION
from loraplex.operator.conditions import condition, merge_conditions, timestamp
from loraplex.operator.daemon import BaseLoop, EngineCache, Sources, Wakers, plain
from loraplex.operator.decide import FINALIZER, LEGACY_FINALIZERS
from loraplex.operator.k8s import Kube
from loraplex.operator.lora import LoraAdapterStatus, LoraPhase
from loraplex.operator.observe import CapabilityCache
from loraplex.operator.plan import MetaPatch
from loraplex.operator.render.meta import BASE_MODEL_LABEL, MANAGED_BY
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
    memo.daemon_states = {}  # (namespace, name) -> BaseState, shared with the change handlers
    memo.seen = {}  # adapter -> what its last event carried that a pass decides on
    # a lookup of an absent kind re-reads discovery: at most every 10 ticks (KEDA installed later)
    memo.capabilities = CapabilityCache(memo.config.render_options("policy/v1"), 10 * memo.config.tick_s)
    await memo.capabilities.get(memo.kube)  # looked up once before the first pass


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    await memo.kube.close()


# Indexes: the daemon reads them every cycle instead of listing from the API server. They keep
# the bodies without what no pass reads (`indexed`: managedFields are half of an adapter).
@kopf.index("pods", labels={"app.kubernetes.io/managed-by": MANAGED_BY})
def server_pods(namespace: str, labels: Mapping[str, str], body: kopf.Body, **_: Any) -> dict[Any, Any]:
    return {(namespace, labels.get(BASE_MODEL_LABEL, "")): indexed(body)}


@kopf.index(GROUP, VERSION, lora_crd.PLURAL)
def adapters_by_base(body: kopf.Body, **_: Any) -> dict[Any, Any] | None:
    key = base_key(body)
    return {key: indexed(body)} if key else None


UNREAD_METADATA = frozenset({"managedFields", "selfLink"})
UNREAD_ANNOTATIONS = frozenset({"kubectl.kubernetes.io/last-applied-configuration"})


def indexed(body: Mapping[str, Any]) -> dict[str, Any]:
    """A plain snapshot of a body without the metadata no pass reads (the field managers, a
    client-side apply's copy of the whole object)."""
    snapshot = plain(body)
    meta = {key: value for key, value in snapshot["metadata"].items() if key not in UNREAD_METADATA}
    if UNREAD_ANNOTATIONS & set(meta.get("annotations") or ()):
        meta["annotations"] = {
            key: value for key, value in meta["annotations"].items() if key not in UNREAD_ANNOTATIONS
        }
    return {**snapshot, "metadata": meta}


@kopf.index(GROUP, VERSION, bmd_crd.PLURAL)
def bases(namespace: str, name: str, **_: Any) -> dict[Any, Any]:
    return {(namespace, name): True}


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
    memo.wakers.wake((namespace, labels.get(BASE_MODEL_LABEL, "")), urgent=True)


@kopf.on.create(GROUP, VERSION, bmd_crd.PLURAL)
@kopf.on.update(GROUP, VERSION, bmd_crd.PLURAL)
@kopf.on.resume(GROUP, VERSION, bmd_crd.PLURAL)
async def apply_children(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Parse, refuse an invalid spec, and wake the base's loop: its plan holds every child (the
    Deployment, Service, PDB, InferencePool, autoscaler, ConfigMap, Secrets) and `act` applies
    them. The name stays `apply_children`: kopf keys its progress annotations by handler id."""
    try:
        bmd = BaseModelDeployment.from_body(body)
    except ValidationError as error:
        await _report_invalid_spec(memo.kube, body, str(error))
        raise kopf.PermanentError(f"invalid spec: {error}") from error
    key = (bmd.namespace, bmd.name)
    if (state := memo.daemon_states.get(key)) is not None:
        state.forget_children()  # compare every child again: the spec changed, or we resumed
    memo.wakers.wake(key)


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
    """observe → decide → act for this base until it is deleted or the operator stops."""
    key = (body["metadata"]["namespace"], body["metadata"]["name"])
    state = memo.daemon_states.setdefault(key, BaseState())
    sources = Sources(
        body=body,
        pods=lambda: list(server_pods.get(key, [])),
        adapters=lambda: list(adapters_by_base.get(key, [])),
        namespace_labels=lambda: _labels(namespace_labels),
    )
    loop = BaseLoop(memo.kube, memo.config, sources, state, memo.capabilities)
    engines = EngineCache(memo.config)
    try:
        while not stopped:
            recheck = None
            try:
                engine = await engines.get(await loop.api_key())
                recheck = (await loop.step(engine, lambda: memo.wakers.wake(key))).recheck_s
            except (ValidationError, kopf.PermanentError):
                pass  # invalid spec: the change handler reported it; wait for a fix
            except Exception:  # one bad pass must not end the loop
                log.exception("pass for %s/%s failed", *key)
            await memo.wakers.sleep(key, recheck or memo.config.tick_s, loop.debounce_s)
    finally:
        memo.daemon_states.pop(key, None)
        await state.cancel()
        await engines.close()


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


@kopf.on.event(GROUP, VERSION, lora_crd.PLURAL)
async def adapter_event(type: str, body: kopf.Body, memo: kopf.Memo, bases: kopf.Index, **_: Any) -> None:
    """Wake the adapter's base when something it decides on changed (not for status writes);
    refuse an adapter whose base does not exist. No API call on the common path."""
    key = base_key(body)
    meta = body["metadata"]
    seen_key = (meta["namespace"], meta["name"])
    if type == "DELETED":
        memo.seen.pop(seen_key, None)
        memo.wakers.wake(key)
        return
    if key is not None and key in bases:
        signature = (
            meta.get("uid"),
            meta.get("generation"),
            meta.get("deletionTimestamp"),
            tuple(meta.get("finalizers") or ()),
            tuple(sorted((meta.get("annotations") or {}).items())),
        )
        if memo.seen.get(seen_key) != signature:
            memo.seen[seen_key] = signature
            memo.wakers.wake(key)
        return
    await _without_base(memo.kube, body, key)


async def _without_base(kube: Kube, body: Mapping[str, Any], key: tuple[str, str] | None) -> None:
    """No such base: say so (once), and never hold a deletion for it."""
    meta = body["metadata"]
    ours = [item for item in meta.get("finalizers") or () if item == FINALIZER or item in LEGACY_FINALIZERS]
    if meta.get("deletionTimestamp"):
        if ours:
            kept = [item for item in meta.get("finalizers") or () if item not in ours]
            release = MetaPatch(meta["namespace"], meta["name"], tuple(kept), tuple(meta["finalizers"]))
            with contextlib.suppress(ApiException):
                await kube.patch_metadata(
                    lora_crd.PLURAL, meta["namespace"], meta["name"], release.json_patch()
                )
        return
    if _condition_reason(body, "Accepted") != "BaseModelNotFound":
        message = f"no BaseModelDeployment {key[0]}/{key[1]}" if key else "spec.baseModel is not set"
        await _refuse(kube, body, "BaseModelNotFound", message)


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


def _condition_reason(body: Mapping[str, Any], condition_type: str) -> str | None:
    conditions = (body.get("status") or {}).get("conditions") or ()
    return next((item.get("reason") for item in conditions if item.get("type") == condition_type), None)


def _labels(index: kopf.Index) -> dict[str, dict[str, str]]:
    return {name: next(iter(store), {}) for name, store in index.items()}
