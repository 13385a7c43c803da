"""`loraplex operator explain <bmd> -n <namespace>`: what the operator observes of one base and
the plan it decides, without acting — so a user can see why an adapter is not Ready.

Reads what the operator's loop reads (the base, its adapters, its pods, namespace labels, key
Secrets) with plain GET/LISTs, asks each running pod for its adapters (pod IPs must be
reachable from where this runs: in the cluster, or on the local cluster), and prints both.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.access import salt_of
from loraplex.operator.admission import admit, base_key
from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.common import GROUP, VERSION
from loraplex.operator.decide import decide, restore_attempts
from loraplex.operator.engine_client import EngineClient
from loraplex.operator.k8s import Kube
from loraplex.operator.observe import Observed, ask_pods, observe_capabilities, pod_bodies_gate, secret_refs
from loraplex.operator.plan import Plan
from loraplex.operator.render import RenderOptions
from loraplex.operator.render.access import ACCESS_KEY, access_secret_name
from loraplex.operator.render.meta import READINESS_GATE, label_selector_string


async def observe_once(kube: Kube, namespace: str, name: str) -> Observed:
    core, custom = CoreV1Api(kube.api_client), CustomObjectsApi(kube.api_client)
    body = await asyncio.to_thread(
        custom.get_namespaced_custom_object, GROUP, VERSION, namespace, bmd_crd.PLURAL, name
    )
    bmd = BaseModelDeployment.from_body(body)
    listed = await asyncio.to_thread(custom.list_cluster_custom_object, GROUP, VERSION, lora_crd.PLURAL)
    adapters = [item for item in listed["items"] if base_key(item) == (namespace, name)]
    pods = await asyncio.to_thread(
        core.list_namespaced_pod, namespace, label_selector=label_selector_string(bmd)
    )
    pod_bodies = [kube.api_client.sanitize_for_serialization(pod) for pod in pods.items]
    api_key = await _api_key(kube, body)
    async with EngineClient(api_key=api_key) as engine:
        reported = await ask_pods(engine, pod_bodies, 8)
    secrets = {ref: await kube.read_secret_key(*ref) for ref in secret_refs(adapters)}
    salt = salt_of(await kube.read_secret_key(namespace, access_secret_name(bmd), ACCESS_KEY)) or b""
    observed = Observed(
        bmd_body=body,
        adapters=adapters,
        namespace_labels=await _namespace_labels(core),
        pods=reported,
        pod_gates=pod_bodies_gate(pod_bodies, READINESS_GATE),
        secrets=secrets,
        salt=salt,
        now=time.time(),
        capabilities=await observe_capabilities(kube, RenderOptions()),
    )
    return Observed(**{**observed.__dict__, "attempts": restore_attempts(observed)})


async def _api_key(kube: Kube, body: dict[str, Any]) -> str | None:
    ref = (body.get("spec") or {}).get("apiKeySecretRef")
    if not ref:
        return None
    return await kube.read_secret_key(body["metadata"]["namespace"], ref["name"], ref["key"])


async def _namespace_labels(core: CoreV1Api) -> dict[str, dict[str, str]]:
    try:
        items = (await asyncio.to_thread(core.list_namespace)).items
    except ApiException:  # not allowed to list namespaces: Selector admission shows as refused
        return {}
    return {item.metadata.name: dict(item.metadata.labels or {}) for item in items}


def render(observed: Observed, plan: Plan) -> Iterator[str]:
    """Human-readable lines: observed first, then the plan."""
    meta = observed.bmd_body["metadata"]
    yield f"BaseModelDeployment {meta['namespace']}/{meta['name']}"
    yield "observed:"
    for pod in observed.pods:
        reports = "not asked" if pod.reports is None else f"{len(pod.reports)} adapter(s) reported"
        why = (
            f" ({pod.error or pod.stuck or pod.unschedulable})"
            if pod.error or pod.stuck or pod.unschedulable
            else ""
        )
        yield f"  pod {pod.name}: running={pod.running} ready={pod.ready} epoch={pod.epoch} {reports}{why}"
    if not observed.pods:
        yield "  no pods"
    bmd = BaseModelDeployment.from_body(observed.bmd_body)
    for verdict in admit(bmd, observed.adapters, observed.namespace_labels):
        served = f" as {verdict.adapter.name}" if verdict.adapter else ""
        yield f"  adapter {verdict.namespace}/{verdict.name}: {verdict.reason}{served} — {verdict.message}"
    yield from _plan_lines(plan)


def _plan_lines(plan: Plan) -> Iterator[str]:
    yield "plan:"
    for child in plan.children:
        yield f"  apply {child['kind']}/{child['metadata']['name']} (skipped by the operator when unchanged)"
    for api_version, kind in plan.deletes:
        yield f"  delete {kind}/{plan.base} ({api_version}) if present"
    for pod, actions in sorted(plan.actions.items()):
        for action in actions:
            yield f"  pod {pod}: {action}"
    if plan.bmd_status is not None:
        status = plan.bmd_status.status
        yield f"  base: {status.get('phase')}, readyReplicas {status.get('readyReplicas', 0)}"
    for patch in plan.lora_statuses:
        yield f"  adapter {patch.namespace}/{patch.name}: {_adapter_line(patch.status)}"
    for gate in plan.gates:
        yield f"  pod {gate.pod}: readiness gate -> {gate.condition['status']} ({gate.condition['reason']})"
    for meta in plan.meta:
        yield f"  adapter {meta.namespace}/{meta.name}: finalizers -> {list(meta.finalizers)} ({meta.reason})"
    if plan.recheck_s:
        yield f"  look again in {plan.recheck_s}s"
    for note in plan.notes:
        yield f"  note: {note}"


def _adapter_line(status: dict[str, Any]) -> str:
    pods = ", ".join(
        f"{item['pod']}={item['state']}" + (f" ({item['lastError']})" if item.get("lastError") else "")
        for item in status.get("instances", [])
    )
    return f"{status.get('phase')} {status.get('readyReplicas', 0)}/{status.get('desiredReplicas', 0)}" + (
        f" [{pods}]" if pods else ""
    )


def explain(namespace: str, name: str) -> str:
    kube = Kube.from_environment()
    observed = asyncio.run(observe_once(kube, namespace, name))
    return "\n".join(render(observed, decide(unwritten(observed))))


def unwritten(observed: Observed) -> Observed:
    """As if no status were stored yet: the plan then carries every status it decides, not only
    the ones that changed (the rest of the plan does not depend on stored status)."""
    adapters = [{**body, "status": {}} for body in observed.adapters]
    return Observed(
        **{**observed.__dict__, "adapters": adapters, "bmd_body": {**observed.bmd_body, "status": {}}}
    )
