"""Observe: everything `decide` needs about one base, gathered into one frozen value.

Kubernetes' side comes from kopf's watch-fed indexes (no LIST per event); the engine's side is
one `GET /v1/adapters` per running pod; access keys are read from their Secrets at most once a
tick. The only I/O here is reading; writing is `act`'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydantic import ValidationError

from loraplex.operator.access import FoundKeys
from loraplex.operator.children import INFERENCE_POOL, KEDA, Capabilities
from loraplex.operator.common import SecretKeyRef
from loraplex.operator.engine_client import EngineClient, EngineClientError
from loraplex.operator.k8s import Kube
from loraplex.operator.lora import spec_of
from loraplex.operator.plan import Key, PodAdapter
from loraplex.operator.pods import PodObservation, observe_pod
from loraplex.operator.reconcile import Attempt
from loraplex.operator.render import RenderOptions
from loraplex.operator.render.autoscaling import HPA_API_VERSIONS, HPA_KIND

T = TypeVar("T")
SecretRef = tuple[str, str, str]  # (namespace, secret, key)


@dataclass(frozen=True)
class Observed:
    """One base as seen at `now`. Bodies are plain dict snapshots of the watched objects."""

    bmd_body: Mapping[str, Any]
    adapters: Sequence[Mapping[str, Any]]  # LoraAdapters attached to this base
    namespace_labels: Mapping[str, Mapping[str, str]]
    pods: Sequence[PodObservation]  # Kubernetes' view plus each reachable pod's reports
    pod_gates: Mapping[str, Mapping[str, Any] | None] = field(default_factory=dict)  # current gate
    secrets: Mapping[SecretRef, str | None] = field(default_factory=dict)  # access key values
    salt: bytes = b""
    attempts: Mapping[PodAdapter, Attempt] = field(default_factory=dict)  # failed loads backing off
    busy: Mapping[PodAdapter, float] = field(default_factory=dict)  # engine calls running, since
    now: float = 0.0
    capabilities: Capabilities = field(default_factory=Capabilities)  # what the API server serves


def pod_bodies_gate(bodies: Sequence[Mapping[str, Any]], gate: str) -> dict[str, Mapping[str, Any] | None]:
    def current(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
        conditions = (body.get("status") or {}).get("conditions") or ()
        return next((item for item in conditions if item.get("type") == gate), None)

    return {body["metadata"]["name"]: current(body) for body in bodies}


async def ask_pods(
    engine: EngineClient, bodies: Sequence[Mapping[str, Any]], concurrency: int
) -> list[PodObservation]:
    """Every pod's Kubernetes view, plus the reports of those that run (asked in parallel)."""
    limit = asyncio.Semaphore(concurrency)

    async def ask(pod: PodObservation) -> PodObservation:
        if pod.url is None:
            return pod
        async with limit:
            try:
                return pod.with_reports(await engine.list_adapters(pod.url))
            except EngineClientError as error:
                return pod.with_error(str(error))

    return list(await gather(ask(observe_pod(body)) for body in bodies))


async def gather(jobs: Any) -> list[T]:
    return list(await asyncio.gather(*jobs))


def secret_refs(bodies: Sequence[Mapping[str, Any]]) -> set[SecretRef]:
    """The key Secrets every protected adapter names (whether or not it is admitted)."""
    refs: set[SecretRef] = set()
    for body in bodies:
        try:
            access = spec_of(body).access
        except ValidationError:
            continue
        for ref in access.api_key_secret_refs if access else ():
            refs.add((body["metadata"]["namespace"], ref.name, ref.key))
    return refs


class SecretCache:
    """Key Secrets read at most once per `max_age_s` (a rotation lands within one tick)."""

    def __init__(self, max_age_s: float) -> None:
        self.max_age_s = max_age_s
        self._values: dict[SecretRef, tuple[str | None, float]] = {}

    async def read(self, kube: Kube, refs: set[SecretRef]) -> dict[SecretRef, str | None]:
        now = time.monotonic()
        stale = [
            ref for ref in refs if ref not in self._values or now - self._values[ref][1] > self.max_age_s
        ]
        values = await gather(_read(kube, ref) for ref in stale)
        self._values.update({ref: (value, now) for ref, value in zip(stale, values, strict=True)})
        for ref in set(self._values) - refs:
            del self._values[ref]
        return {ref: self._values[ref][0] for ref in refs}


def _read(kube: Kube, ref: SecretRef) -> Awaitable[str | None]:
    return kube.read_secret_key(*ref)


def found_keys(
    refs: Mapping[str, tuple[str, list[SecretKeyRef]]], secrets: Mapping[SecretRef, str | None]
) -> FoundKeys:
    """The plain keys by served name, from the values observed (pure)."""
    found = FoundKeys({}, {})
    for name, (namespace, secret_refs_) in refs.items():
        found.keys[name] = []
        for ref in secret_refs_:
            value = secrets.get((namespace, ref.name, ref.key))
            if value:
                found.keys[name].append(value.strip())
            else:
                found.missing.setdefault(name, []).append(f"{ref.name}[{ref.key}]")
    return found


async def observe_capabilities(kube: Kube, options: RenderOptions) -> Capabilities:
    """Which API versions and optional kinds the API server serves (policy/v1 from 1.21,
    autoscaling/v2 from 1.23: the local 1.20 serves v1beta1 and v2beta2 with the same schema)."""
    modern_pdb = await kube.served("policy/v1", "PodDisruptionBudget")
    hpa_v2 = await kube.served(HPA_API_VERSIONS[0], HPA_KIND)
    served = frozenset([kind for kind in (INFERENCE_POOL, KEDA) if await kube.served(*kind)])
    return Capabilities(
        options=replace(options, pdb_api_version="policy/v1" if modern_pdb else "policy/v1beta1"),
        hpa_api_version=HPA_API_VERSIONS[0] if hpa_v2 else HPA_API_VERSIONS[1],
        served=served,
    )


class CapabilityCache:
    """`observe_capabilities` at most once per `max_age_s` (KEDA installed later is picked up)."""

    def __init__(self, options: RenderOptions, max_age_s: float) -> None:
        self.options, self.max_age_s = options, max_age_s
        self._value: Capabilities | None = None
        self._at = 0.0
        self._lock = asyncio.Lock()

    async def get(self, kube: Kube) -> Capabilities:
        async with self._lock:
            if self._value is None or time.monotonic() - self._at > self.max_age_s:
                self._value, self._at = await observe_capabilities(kube, self.options), time.monotonic()
            return self._value


def base_of(body: Mapping[str, Any]) -> Key:
    return body["metadata"]["namespace"], body["metadata"]["name"]
