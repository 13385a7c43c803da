"""The loop of one BaseModelDeployment (DESIGN.md §3): observe → decide → act, then sleep until
something wakes it (a watch event, an engine call finishing) or the safety-net tick.

    while not stopped:
        observed = await observe(base)      # indexes + one GET /v1/adapters per running pod
        plan = decide(observed)              # pure: children, loads/unloads, statuses, gates
        await act(plan)                      # apply, start engine calls, write what changed
        await wakers.sleep(base, plan.recheck_s or tick)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import lora as lora_crd
from loraplex.operator.access import read_salt
from loraplex.operator.act import Actor, BaseState, act
from loraplex.operator.bmd import BaseModelDeployment
from loraplex.operator.credentials import credential_secret_refs
from loraplex.operator.decide import decide, restore_attempts
from loraplex.operator.engine_client import EngineClient
from loraplex.operator.k8s import Kube
from loraplex.operator.memo import DecideCache
from loraplex.operator.observe import (
    CapabilityCache,
    Observed,
    SecretCache,
    ask_pods,
    pod_bodies_gate,
    secret_refs,
)
from loraplex.operator.plan import Key, Plan, StatusPatch
from loraplex.operator.render.meta import READINESS_GATE
from loraplex.operator.settings import OperatorConfig
from loraplex.operator.writer import StatusWriter

log = logging.getLogger(__name__)
DEBOUNCE_S = 0.05  # after a wake-up: let a burst of events land in one pass
# ... or longer while the pods are slow to answer: a pass lists every pod's adapters (600 KB at
# 1000 adapters, on pods busy loading), so the next one waits as long as that took, up to this
MAX_DEBOUNCE_S = 0.5


class Wakers:
    """One event per base model; handlers and finished engine calls set it. A pod's change is
    urgent (a dead pod reaches the base's status first); other wakes wait a debounce so that a
    burst of events lands in one pass."""

    def __init__(self) -> None:
        self._events: dict[Key, asyncio.Event] = {}
        self._urgent: set[Key] = set()

    def event(self, key: Key) -> asyncio.Event:
        return self._events.setdefault(key, asyncio.Event())

    def wake(self, key: Key | None, urgent: bool = False) -> None:
        if key is not None:
            if urgent:
                self._urgent.add(key)
            self.event(key).set()

    async def sleep(self, key: Key, seconds: float, debounce_s: float = DEBOUNCE_S) -> None:
        """Until woken or `seconds`; then `debounce_s` more unless the wake is urgent (checked
        every DEBOUNCE_S, so an urgent wake cuts a long debounce short)."""
        event = self.event(key)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout=seconds)
        if event.is_set():
            deadline = time.monotonic() + max(DEBOUNCE_S, debounce_s)
            while key not in self._urgent and (left := deadline - time.monotonic()) > 0:
                await asyncio.sleep(min(DEBOUNCE_S, left))
        event.clear()
        self._urgent.discard(key)


@dataclass(frozen=True)
class Sources:
    """Where one base's observation comes from: kopf's live body and indexes."""

    body: Mapping[str, Any]
    pods: Callable[[], Sequence[Mapping[str, Any]]]
    adapters: Callable[[], Sequence[Mapping[str, Any]]]
    namespace_labels: Callable[[], Mapping[str, Mapping[str, str]]]


class BaseLoop:
    """observe → decide → act for one base; `explain` runs the first two without the third."""

    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        sources: Sources,
        state: BaseState,
        capabilities: CapabilityCache | None = None,
    ) -> None:
        self.kube, self.config, self.sources, self.state = kube, config, sources, state
        self.capabilities = capabilities or CapabilityCache(
            config.render_options("policy/v1"), 10 * config.tick_s
        )
        if state.writer is None:
            state.writer = StatusWriter(kube)
        self._stored: dict[tuple[str, str, str], dict[str, Any]] = {}
        # the body with our status on top, kept while neither changes: the same object each
        # pass, so the decide cache sees the same stored status
        self._merged: dict[tuple[str, str, str], tuple[Any, Any, Mapping[str, Any]]] = {}
        self.cache = DecideCache()
        self.secrets = SecretCache(config.tick_s)
        self.api_keys = SecretCache(config.tick_s)
        self.observe_s = 0.0  # how long the last pass's observation took

    @property
    def debounce_s(self) -> float:
        """How long a non-urgent wake waits before the next pass (see MAX_DEBOUNCE_S)."""
        return min(MAX_DEBOUNCE_S, max(DEBOUNCE_S, self.observe_s))

    async def api_key(self) -> str | None:
        """The deployment's own key (the engine's admin calls need it), re-read once a tick."""
        ref = (self.sources.body.get("spec") or {}).get("apiKeySecretRef")
        if not ref:
            return None
        secret = (self.sources.body["metadata"]["namespace"], ref["name"], ref["key"])
        return (await self.api_keys.read(self.kube, {secret}))[secret]

    async def observe(self, engine: EngineClient) -> Observed:
        bodies = list(self.sources.pods())
        adapters = [self._as_written(lora_crd.PLURAL, body) for body in self.sources.adapters()]
        names = {(body["metadata"]["namespace"], body["metadata"]["name"]) for body in adapters}
        self._merged = {key: value for key, value in self._merged.items() if key[1:] in names}
        if self.state.writer is not None:  # deleted adapters' last writes: nothing to compare with
            self.state.writer.forget_except(names, lora_crd.PLURAL)
        bmd_body = self._as_written(bmd_crd.PLURAL, plain(self.sources.body))
        if self.state.salt is None:
            self.state.salt = await read_salt(self.kube, BaseModelDeployment.from_body(bmd_body))
        observed = Observed(
            bmd_body=bmd_body,
            adapters=adapters,
            namespace_labels=self.sources.namespace_labels(),
            pods=await ask_pods(engine, bodies, self.config.pod_concurrency),
            pod_gates=pod_bodies_gate(bodies, READINESS_GATE),
            secrets=await self.secrets.read(
                self.kube, secret_refs(adapters) | credential_secret_refs(adapters)
            ),
            salt=self.state.salt,
            attempts=dict(self.state.attempts),
            busy={key: self.state.started.get(key, 0.0) for key in self.state.busy},
            now=time.time(),
            capabilities=await self.capabilities.get(self.kube),
        )
        if not self.state.restored:
            self.state.attempts = restore_attempts(observed)
            self.state.restored = True
            observed = Observed(**{**observed.__dict__, "attempts": dict(self.state.attempts)})
        return observed

    def _as_written(self, plural: str, body: Mapping[str, Any]) -> Mapping[str, Any]:
        """The body with our latest status on top while the watch has not delivered it yet
        (queued, or written over the status still shown): decide then sees its own write."""
        meta, writer = body["metadata"], self.state.writer
        stored = body.get("status") or {}
        key = (plural, meta["namespace"], meta["name"])
        latest = writer.latest(key, stored) if writer else None
        if latest is None:
            self._merged.pop(key, None)
            return body
        self._stored[key] = stored  # what the patch is written over, whatever decide compared with
        kept = self._merged.get(key)
        if kept is not None and kept[0] is body and kept[1] is latest:
            return kept[2]
        merged = {**body, "status": {**stored, **latest}}
        self._merged[key] = (body, latest, merged)
        return merged

    def _written_over_stored(self, plan: Plan) -> Plan:
        stored, self._stored = self._stored, {}

        def fix(patch: StatusPatch | None) -> StatusPatch | None:
            key = (patch.plural, patch.namespace, patch.name) if patch else None
            return replace(patch, seen=stored[key]) if patch and key in stored else patch

        return replace(
            plan, bmd_status=fix(plan.bmd_status), lora_statuses=tuple(map(fix, plan.lora_statuses))
        )

    async def step(self, engine: EngineClient, wake: Callable[[], None]) -> Plan:
        started, hits = time.monotonic(), self.cache.hits
        observed = await self.observe(engine)
        observed_at = time.monotonic()
        self.observe_s = observed_at - started
        plan = self._written_over_stored(decide(observed, self.cache))
        decided_at = time.monotonic()
        live = {pod.name for pod in observed.pods}
        self.state.attempts = {key: value for key, value in self.state.attempts.items() if key[0] in live}
        actor = Actor(self.kube, engine, self.state, wake, self.config.pod_concurrency)
        await act(actor, plan, observed.pods)
        if plan.engine_calls or plan.lora_statuses or plan.meta or plan.bmd_status:
            log.info(
                "pass: observe %.3fs, decide %.3fs (%d cached), act %.3fs; %d engine call(s), "
                "%d status(es), %d meta",
                observed_at - started,
                decided_at - observed_at,
                self.cache.hits - hits,
                time.monotonic() - decided_at,
                plan.engine_calls,
                len(plan.lora_statuses) + (plan.bmd_status is not None),
                len(plan.meta),
            )
        return plan


class EngineCache:
    """One engine client per base, replaced when the deployment's API key changes."""

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


def plain(body: Mapping[str, Any]) -> dict[str, Any]:
    """A snapshot of a kopf body as plain dicts (kopf's views follow the live object)."""
    return {key: (plain(value) if isinstance(value, Mapping) else value) for key, value in body.items()}
