"""One convergence cycle for a base model's pods: ask every running pod once, plan, act, and
return what the pods reported. Kubernetes reads and writes stay with the caller (the daemon).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import (
    AdapterRejected,
    AdapterReport,
    EngineBusy,
    EngineClient,
    EngineClientError,
    EngineHTTPError,
)
from loraplex.operator.pods import PodObservation, observe_pod
from loraplex.operator.reconcile import Action, Attempt, Load, Unload, plan, record_failure

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class CycleResult:
    pods: list[PodObservation]  # reports as of the end of the cycle (list, then load/unload answers)
    attempts: dict[tuple[str, str], Attempt]  # failed loads still backing off, by (pod, adapter)
    acted: bool  # something was loaded or unloaded: the caller should look again soon


async def run_cycle(
    engine: EngineClient,
    desired: Mapping[str, DesiredAdapter],
    pod_bodies: Sequence[Mapping[str, Any]],
    attempts: Mapping[tuple[str, str], Attempt],
    now: float,
    concurrency: int = 8,
) -> CycleResult:
    limit = asyncio.Semaphore(concurrency)
    observed = [observe_pod(body) for body in pod_bodies]
    pods = await _bounded(limit, [_ask(engine, pod) for pod in observed])
    actions = plan(desired, pods, attempts, now)
    outcomes = await _bounded(
        limit, [_act(engine, pod, actions.get(pod.name, []), attempts, now) for pod in pods]
    )
    names = {pod.name for pod in pods}
    kept = {key: value for key, value in attempts.items() if key[0] in names and key[1] in desired}
    for _, changes in outcomes:
        for key, attempt in changes.items():
            if attempt is None:
                kept.pop(key, None)
            else:
                kept[key] = attempt
    return CycleResult([pod for pod, _ in outcomes], kept, any(actions.values()))


async def _bounded(limit: asyncio.Semaphore, jobs: Sequence[Awaitable[T]]) -> list[T]:
    async def one(job: Awaitable[T]) -> T:
        async with limit:
            return await job

    return list(await asyncio.gather(*(one(job) for job in jobs)))


async def _ask(engine: EngineClient, pod: PodObservation) -> PodObservation:
    if pod.url is None:
        return pod
    try:
        return pod.with_reports(await engine.list_adapters(pod.url))
    except EngineClientError as error:
        return pod.with_error(str(error))


async def _act(
    engine: EngineClient,
    pod: PodObservation,
    actions: Sequence[Action],
    attempts: Mapping[tuple[str, str], Attempt],
    now: float,
) -> tuple[PodObservation, dict[tuple[str, str], Attempt | None]]:
    """Run one pod's actions in order; stop at the first sign the pod is down or busy."""
    if pod.reports is None:
        return pod, {}
    reports = {report.name: report for report in pod.reports or ()}
    changes: dict[tuple[str, str], Attempt | None] = {}
    for action in actions:
        try:
            if isinstance(action, Unload):
                await engine.unload_adapter(pod.url or "", action.name)
                reports.pop(action.name, None)
                continue
            report = await engine.load_adapter(pod.url or "", action.adapter)
            reports[action.adapter.name] = report or _loading(action.adapter)
            changes[(pod.name, action.adapter.name)] = None
        except AdapterRejected as error:
            if isinstance(action, Load):
                key = (pod.name, action.adapter.name)
                previous = attempts.get(key)
                changes[key] = record_failure(
                    previous, pod.epoch, action.adapter, error.message, now, error.error_type
                )
            log.warning("pod %s refused %s: %s", pod.name, action, error)
        except EngineBusy as error:
            log.info("pod %s busy, retrying next cycle: %s", pod.name, error)
            break
        except EngineHTTPError as error:  # e.g. 401: the same for every call, do not hammer
            log.warning("pod %s: %s", pod.name, error)
            break
        except EngineClientError as error:
            return pod.with_error(str(error)), changes
    return replace(pod, reports=tuple(reports.values())), changes


def _loading(adapter: DesiredAdapter) -> AdapterReport:
    """Stand-in until the pod lists the adapter: never claim Ready without the pod saying so."""
    return AdapterReport(name=adapter.name, source=adapter.source, state="loading")
