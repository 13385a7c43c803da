"""Decide: one pure function from what was observed of a base to the plan that converges it.

    decide(observed) -> Plan: admit the adapters, render the ConfigMap and access Secret, pick
    the loads and unloads per pod (with backoff), compute both statuses, the readiness gates and
    the adapters' finalizers. No I/O: `act` carries the plan out, `observe` gathers the input.

Spec refusals plug into `SPEC_CHECKS`: each takes the parsed base and returns a condition (the
base is then Failed with it) or None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from types import MappingProxyType
from typing import Any

from pydantic import ValidationError

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.access import access_condition, access_document, key_refs
from loraplex.operator.admission import ATTACHED_ANNOTATION, Verdict, admit, desired_set, qualified_name
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentStatus, BmdPhase
from loraplex.operator.children import workload_children
from loraplex.operator.common import GROUP, Condition
from loraplex.operator.conditions import condition, merge_conditions, timestamp
from loraplex.operator.credentials import credential_files, credential_refs
from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterState
from loraplex.operator.lora import DeletionPolicy, InstanceState, LoraAdapterStatus, LoraPhase
from loraplex.operator.memo import DecideCache, attempts_by_name, status_inputs
from loraplex.operator.memo import entry as memo_entry
from loraplex.operator.observe import Observed, found_keys
from loraplex.operator.plan import GatePatch, MetaPatch, Plan, StatusPatch, Warning_
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import Action, Attempt, Load, plan, readiness_gate
from loraplex.operator.render import build_access_secret, build_configmap
from loraplex.operator.render.credentials import build_credentials_secret
from loraplex.operator.status import LORA_OWNED, attempts_from_status, bmd_status, lora_status

FINALIZER = f"{GROUP}/unload"  # on Unload adapters: released once no pod holds the adapter
LEGACY_FINALIZERS = frozenset({f"{GROUP}/finalizer"})  # kopf's, before the operator kept its own
ACCESS_OWNED = ("AccessKeys",)  # dropped once the adapter no longer has `access`
RECHECK_S = 0.5  # a pod reports an adapter loading that no call of ours waits on (access pending)
NO_STATUS: Mapping[str, Any] = MappingProxyType({})  # one object: the cache compares identity
LOAD_GRACE_S = 2.0  # an adapter's first status waits this long for the loads just started
# Refusals that need the user to change something; NotAllowed may resolve from the base's side.
_REFUSED_PHASE = {"NotAllowed": LoraPhase.PENDING}

SpecCheck = Callable[[BaseModelDeployment], Condition | None]
SPEC_CHECKS: list[SpecCheck] = []


def decide(observed: Observed, cache: DecideCache | None = None) -> Plan:
    """The plan for one base; `cache` (the base's loop keeps one) only saves recomputing the
    statuses of adapters whose inputs did not change."""
    try:
        bmd = BaseModelDeployment.from_body(observed.bmd_body)
    except ValidationError as error:  # the change handler reports it: wait for a fix
        return Plan(notes=(f"invalid spec: {error.error_count()} error(s); nothing done",))
    refusals = [found for check in SPEC_CHECKS if (found := check(bmd)) is not None]
    verdicts = admitted(bmd, observed)
    desired = desired_set(verdicts)
    secret, keys = _access(bmd, verdicts, observed)
    actions = _actions(desired, observed)
    bmd_patch = _bmd_patch(bmd, desired, observed, refusals)
    starting = {(pod, _target(a)): observed.now for pod, acts in actions.items() for a in acts}
    loras, warnings = _lora_patches(
        verdicts, replace(observed, busy={**starting, **observed.busy}), keys, cache
    )
    workload = workload_children(bmd, observed.capabilities)
    return Plan(
        namespace=bmd.namespace,
        base=bmd.name,
        children=(  # keys and adapters first: the pods read them
            secret,
            build_credentials_secret(
                bmd, credential_files(credential_refs(verdicts, observed.adapters), observed.secrets)
            ),
            build_configmap(bmd, desired.values()),
            *workload.apply,
        ),
        deletes=workload.delete,
        actions=actions,
        bmd_status=bmd_patch,
        lora_statuses=loras,
        gates=_gates(bmd, desired, observed) if bmd.spec.readiness_gate else (),
        meta=_meta_patches(bmd, verdicts, observed),
        warnings=warnings,
        recheck_s=_recheck(desired, observed, actions),
        notes=(*_notes(verdicts, observed), *workload.notes),
    )


def admitted(bmd: BaseModelDeployment, observed: Observed) -> list[Verdict]:
    """The admission verdicts, adapters without access keys marked open (their loads say so)."""
    verdicts = admit(bmd, observed.adapters, observed.namespace_labels)
    _, open_names = key_refs(verdicts, observed.adapters)
    opened = set(open_names)
    return [
        replace(v, adapter=v.adapter.model_copy(update={"open": True}))
        if v.adapter is not None and v.adapter.name in opened
        else v
        for v in verdicts
    ]


def _access(
    bmd: BaseModelDeployment, verdicts: Sequence[Verdict], observed: Observed
) -> tuple[dict[str, Any], dict[str, Condition]]:
    """The access Secret and the AccessKeys condition of each protected adapter, by served name."""
    refs, open_names = key_refs(verdicts, observed.adapters)
    found = found_keys(refs, observed.secrets)
    conditions = {
        verdict.adapter.name: item
        for verdict in verdicts
        if verdict.adapter is not None
        and (item := access_condition(verdict.adapter.name, refs, found, verdict.generation)) is not None
    }
    return build_access_secret(bmd, access_document(observed.salt, found.keys, open_names)), conditions


def _actions(desired: Mapping[str, DesiredAdapter], observed: Observed) -> dict[str, list[Action]]:
    """Loads and unloads per reachable pod, leaving out those an earlier call still runs."""
    planned = plan(desired, observed.pods, observed.attempts, observed.now)
    return {
        pod: kept
        for pod, actions in planned.items()
        if (kept := [action for action in actions if (pod, _target(action)) not in observed.busy])
    }


def _target(action: Action) -> str:
    return action.adapter.name if isinstance(action, Load) else action.name


def _bmd_patch(
    bmd: BaseModelDeployment,
    desired: Mapping[str, DesiredAdapter],
    observed: Observed,
    refusals: Sequence[Condition],
) -> StatusPatch | None:
    old_raw = observed.bmd_body.get("status") or {}
    old = BaseModelDeploymentStatus.model_validate(old_raw)
    status = bmd_status(bmd, desired, observed.pods, old, observed.now)
    if refusals:
        owned = {item.type for item in refusals}
        conditions = merge_conditions(status.conditions, refusals, timestamp(observed.now), owned)
        status = status.model_copy(update={"phase": BmdPhase.FAILED, "conditions": conditions})
    return _changed(bmd_crd.PLURAL, observed.bmd_body, status.to_k8s())


def _changed(plural: str, body: Mapping[str, Any], new: dict[str, Any]) -> StatusPatch | None:
    """A patch only when a key we write differs from what is stored."""
    meta, old = body["metadata"], body.get("status") or {}
    ours = {key: old[key] for key in new if key in old}
    return None if new == ours else StatusPatch(plural, meta["namespace"], meta["name"], new, dict(old))


def _lora_patches(
    verdicts: Sequence[Verdict],
    observed: Observed,
    keys: Mapping[str, Condition],
    cache: DecideCache | None = None,
) -> tuple[tuple[StatusPatch, ...], tuple[Warning_, ...]]:
    bodies = {_key(body): body for body in observed.adapters}
    attempts = attempts_by_name(observed.attempts)
    patches, warnings = [], []
    for verdict in verdicts:
        if verdict.reason == "Deleting":
            continue  # going away: its finalizer waits for the unload, no status to write
        body = bodies[(verdict.namespace, verdict.name)]
        old_raw = body.get("status") or NO_STATUS
        access = keys.get(verdict.adapter.name) if verdict.adapter is not None else None
        name = verdict.adapter.name if verdict.adapter is not None else ""
        inputs = status_inputs(verdict, observed.pods, attempts.get(name, ()), access, observed.now)
        found = cache.lookup(_key(body), inputs, old_raw) if cache is not None else None
        if found is None:
            old = LoraAdapterStatus.model_validate(old_raw)
            status = adapter_status(verdict, observed.pods, observed, old, access)
            found = memo_entry(inputs, old_raw, status, _changed(lora_crd.PLURAL, body, status.to_k8s()))
            if cache is not None:
                cache.store(_key(body), found)
        status = found.status
        if _loading_briefly(status, observed):
            continue  # a fast load is about to report Ready: write once, not Loading then Ready
        if found.patch is not None:
            patches.append(found.patch)
        turned_failed = status.phase == LoraPhase.FAILED and old_raw.get("phase") != LoraPhase.FAILED.value
        if turned_failed and (warning := _warning(body, status)) is not None:
            warnings.append(warning)
    if cache is not None:
        cache.keep_only(set(bodies))
    return tuple(patches), tuple(warnings)


def _loading_briefly(status: LoraAdapterStatus, observed: Observed) -> bool:
    """Every pod that does not have it Ready runs a load of it started under LOAD_GRACE_S ago."""
    waiting = [item.pod for item in status.instances if item.state != InstanceState.READY]
    started = [observed.busy.get((pod, status.served_name or "")) for pod in waiting]
    return bool(waiting) and all(at is not None and observed.now - at < LOAD_GRACE_S for at in started)


def adapter_status(
    verdict: Verdict,
    pods: Sequence[PodObservation],
    observed: Observed,
    old: LoraAdapterStatus,
    keys: Condition | None = None,
) -> LoraAdapterStatus:
    """One adapter's status: its admission verdict, then (if admitted) what each pod holds."""
    now = observed.now
    accepted = condition("Accepted", verdict.accepted, verdict.reason, verdict.message, verdict.generation)
    if verdict.adapter is None:  # refused: nothing of it is loaded, only the verdict to report
        return LoraAdapterStatus(
            observed_generation=verdict.generation,
            phase=_REFUSED_PHASE.get(verdict.reason, LoraPhase.FAILED),
            conditions=merge_conditions(old.conditions, [accepted], timestamp(now), LORA_OWNED),
            tokens=old.tokens,
        )
    name = verdict.adapter.name
    by_pod = {pod: attempt for (pod, served), attempt in observed.attempts.items() if served == name}
    status = lora_status(verdict.adapter, verdict.generation, pods, by_pod, old, now)
    asserted = [accepted] if keys is None else [accepted, keys]
    conditions = merge_conditions(status.conditions, asserted, timestamp(now), ACCESS_OWNED)
    return status.model_copy(update={"conditions": conditions})


def _warning(body: Mapping[str, Any], status: LoraAdapterStatus) -> Warning_ | None:
    """A Warning event when an adapter turns Failed (kubectl describe shows it)."""
    failure = next((c for c in status.conditions if c.status.value == "False" and c.type == "Accepted"), None)
    failure = failure or next(
        (c for c in status.conditions if c.type not in ("Accepted", "Loaded", "Ready", *ACCESS_OWNED)), None
    )
    if failure is None:
        return None
    return Warning_(dict(body), failure.reason or failure.type, failure.message)


def _gates(
    bmd: BaseModelDeployment, desired: Mapping[str, DesiredAdapter], observed: Observed
) -> tuple[GatePatch, ...]:
    gates = []
    for pod in observed.pods:
        wanted = readiness_gate(pod, desired, observed.pod_gates.get(pod.name))
        if wanted is not None:
            gates.append(GatePatch(pod.name, wanted))
    return tuple(gates)


def _meta_patches(
    bmd: BaseModelDeployment, verdicts: Sequence[Verdict], observed: Observed
) -> tuple[MetaPatch, ...]:
    by_key = {(verdict.namespace, verdict.name): verdict for verdict in verdicts}
    patches = []
    for body in observed.adapters:
        patch = meta_patch(body, by_key[_key(body)], observed, f"{bmd.namespace}/{bmd.name}")
        if patch is not None:
            patches.append(patch)
    return tuple(patches)


def meta_patch(body: Mapping[str, Any], verdict: Verdict, observed: Observed, base: str) -> MetaPatch | None:
    """Our finalizer on an Unload adapter once admitted; released as soon as no pod holds it
    (or at once for Orphan). Also records the attachment on first acceptance."""
    meta = body["metadata"]
    finalizers = list(meta.get("finalizers") or ())
    ours = [item for item in finalizers if item == FINALIZER or item in LEGACY_FINALIZERS]
    unload = (body.get("spec") or {}).get("deletionPolicy", DeletionPolicy.UNLOAD.value) == "Unload"
    if meta.get("deletionTimestamp"):
        keep, reason = bool(ours) and unload and _held(body, observed), "release"
    else:
        keep, reason = unload and verdict.accepted, "attach"
    wanted = [item for item in finalizers if item not in ours] + ([FINALIZER] if keep else [])
    annotations = {}
    if verdict.accepted and ATTACHED_ANNOTATION not in (meta.get("annotations") or {}):
        annotations[ATTACHED_ANNOTATION] = base
    if wanted == finalizers and not annotations:
        return None
    observed = tuple(finalizers) if "finalizers" in meta else None
    has_annotations = meta.get("annotations") is not None
    return MetaPatch(
        meta["namespace"], meta["name"], tuple(wanted), observed, annotations, has_annotations, reason
    )


def _held(body: Mapping[str, Any], observed: Observed) -> bool:
    """Whether a pod still serves this adapter (its names with its source: another adapter may
    take the name next). A pod that does not answer restarts from the ConfigMap, without it."""
    meta, spec = body["metadata"], body.get("spec") or {}
    names = {spec.get("servedName") or meta["name"], qualified_name(meta["namespace"], meta["name"])}
    source = (spec.get("source") or {}).get("uri")
    return any(
        (report := pod.reports_by_name.get(name)) is not None and report.source == source
        for pod in observed.pods
        for name in names
    ) or any((pod.name, name) in observed.busy for pod in observed.pods for name in names)


def _recheck(
    desired: Mapping[str, DesiredAdapter], observed: Observed, actions: Mapping[str, list[Action]]
) -> float | None:
    """Look again soon while a pod says `loading` and no call of ours will wake us."""
    for pod in observed.pods:
        for report in pod.reports or ():
            if report.state == AdapterState.LOADING and (pod.name, report.name) not in observed.busy:
                return RECHECK_S
    # a load outlasting the grace still gets its Loading status written, at the grace's end
    waits = [wait for at in observed.busy.values() if (wait := at + LOAD_GRACE_S - observed.now) > 0]
    return max(0.05, min(waits)) if waits else None


def _notes(verdicts: Sequence[Verdict], observed: Observed) -> tuple[str, ...]:
    refused = [f"{v.namespace}/{v.name}: {v.reason}" for v in verdicts if not v.accepted]
    notes = [f"{len(verdicts) - len(refused)} adapter(s) admitted, {len(refused)} refused"]
    notes += [f"refused {line}" for line in refused]
    notes += [f"pod {pod.name}: {pod.error or pod.stuck}" for pod in observed.pods if pod.error or pod.stuck]
    return tuple(notes)


def _key(body: Mapping[str, Any]) -> tuple[str, str]:
    return body["metadata"]["namespace"], body["metadata"]["name"]


def restore_attempts(observed: Observed) -> dict[tuple[str, str], Attempt]:
    """Backoff records as a restarted operator finds them in the adapters' status."""
    bmd = BaseModelDeployment.from_body(observed.bmd_body)
    bodies = {_key(body): body for body in observed.adapters}
    restored: dict[tuple[str, str], Attempt] = {}
    for verdict in admitted(bmd, observed):
        if verdict.adapter is not None:
            body = bodies[(verdict.namespace, verdict.name)]
            status = LoraAdapterStatus.model_validate(body.get("status") or {})
            restored.update(attempts_from_status(verdict.adapter, status, observed.pods))
    return restored
