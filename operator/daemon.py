"""The reconciling daemon of one BaseModelDeployment (DESIGN.md §3): each cycle it admits the
adapters, keeps the ConfigMap current, converges every pod, then writes both resources' status
and the pods' readiness gate from what the pods reported. Wakes on pod and adapter changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.access import read_salt, render_access
from loraplex.operator.admission import Verdict, admit, desired_set
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentStatus
from loraplex.operator.common import Condition
from loraplex.operator.conditions import condition, merge_conditions, timestamp
from loraplex.operator.credentials import apply_credentials
from loraplex.operator.cycle import CycleResult, run_cycle
from loraplex.operator.engine_client import EngineClient
from loraplex.operator.k8s import Kube
from loraplex.operator.lora import LoraAdapterStatus, LoraPhase
from loraplex.operator.pods import observe_pod
from loraplex.operator.reconcile import Attempt, readiness_gate
from loraplex.operator.render import RenderOptions, build_configmap
from loraplex.operator.render.meta import READINESS_GATE, content_hash
from loraplex.operator.settings import OperatorConfig
from loraplex.operator.status import LORA_OWNED, attempts_from_status, bmd_status, lora_status

log = logging.getLogger(__name__)
Key = tuple[str, str]
# Refusals that need the user to change something; NotAllowed may resolve from the base's side.
_REFUSED_PHASE = {"NotAllowed": LoraPhase.PENDING}
ACCESS_OWNED = ("AccessKeys",)  # dropped once the adapter no longer has `access`


class Wakers:
    """One event per base model; handlers set it when something the daemon reads changed."""

    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}

    def event(self, key: Key) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def wake(self, key: Key | None) -> None:
        if key is not None:
            self.event(key).set()

    async def sleep(self, key: Key, seconds: float) -> None:
        event = self.event(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)
        event.clear()


@dataclass
class DaemonState:
    """What one daemon carries between cycles (rebuilt from status after an operator restart)."""

    attempts: dict[tuple[str, str], Attempt] = field(default_factory=dict)
    configmap_hash: str | None = None
    access_hash: str | None = None
    access_salt: bytes | None = None  # read back from the access Secret once, then kept
    credentials_hash: str | None = None
    restored: bool = False


@dataclass(frozen=True)
class World:
    """This cycle's snapshot of what the daemon reads from the indexes."""

    bmd_body: Mapping[str, Any]
    pods: Sequence[Mapping[str, Any]]
    adapters: Sequence[Mapping[str, Any]]
    namespace_labels: Mapping[str, Mapping[str, str]]


async def converge_once(
    kube: Kube,
    engine: EngineClient,
    state: DaemonState,
    world: World,
    config: OperatorConfig,
    options: RenderOptions,
) -> bool:
    """One cycle; True when something was loaded or unloaded (look again soon)."""
    bmd = BaseModelDeployment.from_body(world.bmd_body)
    verdicts = admit(bmd, world.adapters, world.namespace_labels)
    desired = desired_set(verdicts)
    access = await _apply_access(kube, bmd, state, verdicts, world)  # before the list: keys land first
    state.credentials_hash = await apply_credentials(
        kube, bmd, verdicts, world.adapters, state.credentials_hash
    )
    configmap = build_configmap(bmd, desired.values())
    if (digest := content_hash(configmap)) != state.configmap_hash:
        await kube.apply(configmap)  # pods started from now on preload the current set
        state.configmap_hash = digest
    if not state.restored:
        state.attempts = _restore_attempts(verdicts, world)
        state.restored = True
    now = time.time()
    result = await run_cycle(engine, desired, world.pods, state.attempts, now, config.pod_concurrency)
    state.attempts = result.attempts
    await _write_bmd_status(kube, bmd, desired, result, world, now)
    await _write_lora_statuses(kube, verdicts, result, world, now, access)
    if bmd.spec.readiness_gate:
        await _write_gates(kube, bmd, desired, result, world)
    return result.acted


async def _apply_access(
    kube: Kube, bmd: BaseModelDeployment, state: DaemonState, verdicts: Sequence[Verdict], world: World
) -> dict[str, Condition]:
    """Re-read the referenced key Secrets every cycle (rotation needs no watch) and rewrite the
    access Secret when its content changed; the AccessKeys conditions, by served name."""
    if state.access_salt is None:
        state.access_salt = await read_salt(kube, bmd)
    secret, conditions = await render_access(kube, bmd, verdicts, world.adapters, state.access_salt)
    if (digest := content_hash(secret)) != state.access_hash:
        await kube.apply(secret)
        state.access_hash = digest
    return conditions


def _restore_attempts(verdicts: Sequence[Verdict], world: World) -> dict[tuple[str, str], Attempt]:
    pods = [observe_pod(body) for body in world.pods]
    bodies = {_key(body): body for body in world.adapters}
    restored: dict[tuple[str, str], Attempt] = {}
    for verdict in verdicts:
        if verdict.adapter is not None:
            status = LoraAdapterStatus.model_validate(
                bodies[(verdict.namespace, verdict.name)].get("status") or {}
            )
            restored.update(attempts_from_status(verdict.adapter, status, pods))
    return restored


async def _write_bmd_status(
    kube: Kube,
    bmd: BaseModelDeployment,
    desired: Mapping[str, Any],
    result: CycleResult,
    world: World,
    now: float,
) -> None:
    old_raw = world.bmd_body.get("status") or {}
    new = bmd_status(
        bmd, desired, result.pods, BaseModelDeploymentStatus.model_validate(old_raw), now
    ).to_k8s()
    if new != _ours(old_raw, new):
        await kube.patch_status(bmd_crd.PLURAL, bmd.namespace, bmd.name, new)


async def _write_lora_statuses(
    kube: Kube,
    verdicts: Sequence[Verdict],
    result: CycleResult,
    world: World,
    now: float,
    access: Mapping[str, Condition],
) -> None:
    """`access`: the AccessKeys condition of each protected adapter, by served name."""
    bodies = {_key(body): body for body in world.adapters}
    for verdict in verdicts:
        if verdict.reason == "Deleting":
            continue  # the object is going away; its delete handler waits for the unload
        body = bodies[(verdict.namespace, verdict.name)]
        old_raw = body.get("status") or {}
        old = LoraAdapterStatus.model_validate(old_raw)
        keys = access.get(verdict.adapter.name) if verdict.adapter is not None else None
        new_status = lora_verdict_status(verdict, result, old, now, keys)
        new = new_status.to_k8s()
        if new != _ours(old_raw, new):
            await kube.patch_status(lora_crd.PLURAL, verdict.namespace, verdict.name, new)
        if new_status.phase == LoraPhase.FAILED and old_raw.get("phase") != LoraPhase.FAILED.value:
            _warn(body, new_status)


def _warn(body: Mapping[str, Any], status: LoraAdapterStatus) -> None:
    """A Kubernetes Warning event on the adapter when it turns Failed (kubectl describe shows it)."""
    failure = next((c for c in status.conditions if c.status.value == "False" and c.type == "Accepted"), None)
    failure = failure or next(
        (c for c in status.conditions if c.type not in ("Accepted", "Loaded", "Ready", *ACCESS_OWNED)), None
    )
    if failure is not None:
        kopf.warn(dict(body), reason=failure.reason or failure.type, message=failure.message)


def lora_verdict_status(
    verdict: Verdict, result: CycleResult, old: LoraAdapterStatus, now: float, keys: Condition | None = None
) -> LoraAdapterStatus:
    accepted = condition("Accepted", verdict.accepted, verdict.reason, verdict.message, verdict.generation)
    if verdict.adapter is None:  # refused: nothing of it is loaded, only the verdict to report
        return LoraAdapterStatus(
            observed_generation=verdict.generation,
            phase=_REFUSED_PHASE.get(verdict.reason, LoraPhase.FAILED),
            conditions=merge_conditions(old.conditions, [accepted], timestamp(now), LORA_OWNED),
            tokens=old.tokens,
        )
    by_pod = {
        pod: attempt for (pod, name), attempt in result.attempts.items() if name == verdict.adapter.name
    }
    status = lora_status(verdict.adapter, verdict.generation, result.pods, by_pod, old, now)
    asserted = [accepted] if keys is None else [accepted, keys]
    conditions = merge_conditions(status.conditions, asserted, timestamp(now), ACCESS_OWNED)
    return status.model_copy(update={"conditions": conditions})


async def _write_gates(
    kube: Kube, bmd: BaseModelDeployment, desired: Mapping[str, Any], result: CycleResult, world: World
) -> None:
    bodies = {body["metadata"]["name"]: body for body in world.pods}
    for pod in result.pods:
        current = _pod_condition(bodies[pod.name], READINESS_GATE)
        wanted = readiness_gate(pod, desired, current)
        if wanted is not None:
            gate = {"type": READINESS_GATE, **wanted, "lastTransitionTime": timestamp(time.time())}
            await kube.set_pod_condition(bmd.namespace, pod.name, gate)


def _pod_condition(body: Mapping[str, Any], condition_type: str) -> Mapping[str, Any] | None:
    conditions = (body.get("status") or {}).get("conditions") or ()
    return next((item for item in conditions if item.get("type") == condition_type), None)


def _ours(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The old status restricted to the keys we write, so a no-op cycle writes nothing."""
    return {key: old[key] for key in new if key in old}


def _key(body: Mapping[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]
