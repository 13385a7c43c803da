"""Act: carry out a `Plan` — apply children, start engine calls, hand over what to write.

Engine calls run as tasks (per pod at most `concurrency` at once); each one that finishes
records its outcome and wakes the base, so the next pass reports it within milliseconds.
Statuses and finalizer patches go to the base's writer (`writer.py`): the pass never waits on
them, and the base's status is written first (it carries the pod counts).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from loraplex.operator.conditions import timestamp
from loraplex.operator.engine_client import (
    AdapterRejected,
    EngineBusy,
    EngineClient,
    EngineClientError,
    EngineHTTPError,
)
from loraplex.operator.k8s import Kube
from loraplex.operator.plan import GatePatch, Plan, PodAdapter
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import Action, Attempt, Load, Unload, record_failure
from loraplex.operator.render.meta import READINESS_GATE, content_hash
from loraplex.operator.writer import StatusWriter

log = logging.getLogger(__name__)
# A burst queues hundreds of loads per pod: one written status each (Ready), not Loading first,
# unless one waits this long in the queue (then Loading is news worth a write); a running
# call then has decide.LOAD_GRACE_S.
QUEUED_S = 30.0


@dataclass
class BaseState:
    """What one base's loop carries between passes (rebuilt after an operator restart)."""

    attempts: dict[PodAdapter, Attempt] = field(default_factory=dict)
    busy: dict[PodAdapter, asyncio.Task[None]] = field(default_factory=dict)
    # unix seconds, of busy calls: when the call began; a call still queued behind the pod's
    # limit counts as beginning QUEUED_S after it was queued (its status waits for it till then)
    started: dict[PodAdapter, float] = field(default_factory=dict)
    applied: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> content hash
    deleted: set[tuple[str, str]] = field(default_factory=set)  # (apiVersion, kind) deleted already
    applying: asyncio.Task[None] | None = None  # the children's applies, off the pass
    gates: dict[str, dict[str, str]] = field(default_factory=dict)  # pod -> gate condition written
    gate_writes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    writer: StatusWriter | None = None  # set by the loop: status writes off the pass
    limits: dict[str, asyncio.Semaphore] = field(default_factory=dict)  # per pod
    salt: bytes | None = None
    restored: bool = False

    def forget_children(self) -> None:
        """The base's spec changed (or a child may have drifted): apply and delete again."""
        self.applied.clear()
        self.deleted.clear()

    async def cancel(self) -> None:
        tasks = [*self.busy.values(), *self.gate_writes.values(), *([self.applying] if self.applying else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.writer is not None:
            await self.writer.close()


@dataclass(frozen=True)
class Actor:
    kube: Kube
    engine: EngineClient
    state: BaseState
    wake: Callable[[], None]
    concurrency: int = 8
    clock: Callable[[], float] = time.time  # backoff deadlines are unix seconds


async def act(actor: Actor, plan: Plan, pods: Sequence[PodObservation]) -> None:
    """Nothing here waits on the API server: engine calls, the children's applies and readiness
    gates run as tasks, statuses are queued (a ConfigMap write on a busy API server must not
    hold back the next pass, its loads or a dead pod's statuses)."""
    start_engine_calls(actor, plan.actions, pods)
    writer = actor.state.writer
    if writer is None:
        raise RuntimeError("BaseState.writer is not set")
    if plan.bmd_status is not None:
        writer.submit(plan.bmd_status, first=True)  # the pod counts before the adapters'
    for meta in plan.meta:
        writer.submit_meta(meta)
    for patch in plan.lora_statuses:
        writer.submit(patch)
    start_applies(actor, plan)
    for gate in plan.gates:
        start_gate_write(actor, plan.namespace, gate)
    for warning in plan.warnings:
        kopf.warn(warning.body, reason=warning.reason, message=warning.message)


def start_gate_write(actor: Actor, namespace: str, gate: GatePatch) -> asyncio.Task[None] | None:
    """One pod's readiness-gate condition, unless it was just written (the pod's watch event
    has not shown it yet) or a write of it is still running."""
    running = actor.state.gate_writes.get(gate.pod)
    if (running is not None and not running.done()) or actor.state.gates.get(gate.pod) == gate.condition:
        return None

    async def write() -> None:
        body = {"type": READINESS_GATE, **gate.condition, "lastTransitionTime": timestamp(time.time())}
        try:
            if await _tolerate_gone(actor.kube.set_pod_condition(namespace, gate.pod, body)):
                actor.state.gates[gate.pod] = gate.condition
        except Exception:  # the next pass plans it again
            log.exception("readiness gate of pod %s/%s", namespace, gate.pod)

    task = asyncio.create_task(write())
    actor.state.gate_writes[gate.pod] = task
    return task


def start_applies(actor: Actor, plan: Plan) -> asyncio.Task[None] | None:
    """Apply what changed in a task of its own, one at a time: while one runs, a newer plan waits
    for the next pass (the task wakes the loop when it ends, and a failure is retried then)."""
    running = actor.state.applying
    if running is not None and not running.done():
        return None
    changed = any(
        actor.state.applied.get((c["kind"], c["metadata"]["name"])) != content_hash(c) for c in plan.children
    )
    if not changed and all(kind in actor.state.deleted for kind in plan.deletes):
        return None
    task = asyncio.create_task(_apply_all(actor, plan))
    actor.state.applying = task
    task.add_done_callback(lambda _: actor.wake())
    return task


async def _apply_all(actor: Actor, plan: Plan) -> None:
    try:
        await _apply_children(actor, plan.children)
        await _delete_children(actor, plan)
    except Exception:  # the next pass tries again: the content hash was not recorded
        log.exception("applying the children of %s/%s failed", plan.namespace, plan.base)


async def _apply_children(actor: Actor, children: Sequence[dict[str, Any]]) -> None:
    for child in children:
        key = (child["kind"], child["metadata"]["name"])
        digest = content_hash(child)
        if actor.state.applied.get(key) != digest:
            await actor.kube.apply(child)
            actor.state.applied[key] = digest
            actor.state.deleted.discard((child["apiVersion"], child["kind"]))


async def _delete_children(actor: Actor, plan: Plan) -> None:
    """Unwanted kinds (an HPA no longer asked for), deleted once until the spec changes."""
    for api_version, kind in plan.deletes:
        if (api_version, kind) not in actor.state.deleted:
            await actor.kube.delete(api_version, kind, plan.namespace, plan.base)
            actor.state.deleted.add((api_version, kind))
            actor.state.applied.pop((kind, plan.base), None)


async def _tolerate_gone(call: Awaitable[Any]) -> bool:
    """False when the object is gone (404) or changed under us (409): the next pass sees why."""
    try:
        await call
        return True
    except ApiException as error:
        if error.status in (404, 409):
            return False
        raise


def start_engine_calls(
    actor: Actor, actions: Mapping[str, Sequence[Action]], pods: Sequence[PodObservation]
) -> list[asyncio.Task[None]]:
    """One task per (pod, adapter); a pod's tasks share its concurrency limit."""
    by_name = {pod.name: pod for pod in pods}
    tasks = []
    for pod_name, steps_of_pod in actions.items():
        limit = actor.state.limits.setdefault(pod_name, asyncio.Semaphore(actor.concurrency))
        for name, steps in _by_target(steps_of_pod).items():
            key = (pod_name, name)
            task = asyncio.create_task(_run(actor, by_name[pod_name], steps, limit))
            actor.state.busy[key] = task
            actor.state.started[key] = actor.clock() + QUEUED_S
            task.add_done_callback(lambda _, key=key: _finished(actor, key))
            tasks.append(task)
    return tasks


def _finished(actor: Actor, key: PodAdapter) -> None:
    actor.state.busy.pop(key, None)
    actor.state.started.pop(key, None)
    actor.wake()


def _by_target(actions: Sequence[Action]) -> dict[str, list[Action]]:
    grouped: dict[str, list[Action]] = {}
    for action in actions:
        grouped.setdefault(action.adapter.name if isinstance(action, Load) else action.name, []).append(
            action
        )
    return grouped


async def _run(actor: Actor, pod: PodObservation, steps: Sequence[Action], limit: asyncio.Semaphore) -> None:
    async with limit:
        key = (pod.name, _by_target(steps).popitem()[0])
        if key in actor.state.started:
            actor.state.started[key] = min(actor.state.started[key], actor.clock())
        for step in steps:
            if not await _call(actor, pod, step):
                return


async def _call(actor: Actor, pod: PodObservation, step: Action) -> bool:
    """One engine call; False stops this adapter's remaining steps on the pod."""
    url = pod.url or ""
    try:
        if isinstance(step, Unload):
            await actor.engine.unload_adapter(url, step.name)
        else:
            await actor.engine.load_adapter(url, step.adapter)
            actor.state.attempts.pop((pod.name, step.adapter.name), None)
        return True
    except AdapterRejected as error:
        if isinstance(step, Load):
            key = (pod.name, step.adapter.name)
            actor.state.attempts[key] = record_failure(
                actor.state.attempts.get(key),
                pod.epoch,
                step.adapter,
                error.message,
                actor.clock(),
                error.error_type,
            )
        log.warning("pod %s refused %s: %s", pod.name, step, error)
    except EngineBusy as error:
        log.info("pod %s busy, retrying next pass: %s", pod.name, error)
    except EngineHTTPError as error:  # e.g. 401: the same for every call
        log.warning("pod %s: %s", pod.name, error)
    except EngineClientError as error:
        log.info("pod %s unreachable: %s", pod.name, error)
    return False
