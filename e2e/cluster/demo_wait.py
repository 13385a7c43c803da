"""Waiting for a deployed base model the way its user does: until it serves.

`make demo` (and its test) wait for all of these at once, in one poll: the BaseModelDeployment
Ready on every replica (for its current generation), every adapter Ready on every replica, the
Service's EndpointSlices listing every replica as ready, and then the base and every adapter
answering on every one of those endpoints. A status alone is not enough: it can say Ready
for pods that are gone, and an adapter Ready 2/2 says nothing about the Service's endpoints.
A timeout names each thing still missing and what it was instead.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Kubectl = Callable[..., str]  # kubectl(*args) -> stdout, raising on failure
Report = Callable[[str], None]


@dataclass(frozen=True)
class Target:
    """What must serve: a base model (its BMD, Service and served name share the name)."""

    namespace: str
    base: str
    adapters: tuple[str, ...]
    replicas: int


@dataclass(frozen=True)
class Observation:
    """One poll of the cluster: statuses as reported, ready endpoints, and failed probes."""

    base: dict[str, Any]  # the BMD's status, plus "_generation" from its metadata
    adapters: dict[str, dict[str, Any]]  # name -> status ({} while it does not exist)
    endpoints: tuple[str, ...]  # ip:port of the Service's ready endpoints
    refusals: dict[str, str] = field(default_factory=dict)  # "model@ip:port" -> why it did not answer

    def missing(self, target: Target) -> list[str]:
        """Everything not yet as the target needs it, each with what it is now; [] = serving."""
        wanted = target.replicas
        missing = []
        base = self.base
        current = base.get("observedGeneration") == base.get("_generation")
        if base.get("phase") != "Ready" or base.get("readyReplicas") != wanted or not current:
            missing.append(f"{target.base} Ready {wanted}/{wanted} (is {_phase(base, wanted)})")
        for name in target.adapters:
            status = self.adapters.get(name, {})
            if status.get("phase") != "Ready" or status.get("readyReplicas") != wanted:
                missing.append(f"adapter {name} Ready {wanted}/{wanted} (is {_phase(status, wanted)})")
        if len(self.endpoints) != wanted:
            missing.append(f"{wanted} ready endpoints of Service {target.base} (has {len(self.endpoints)})")
        missing += [f"{where} answering (got {why})" for where, why in sorted(self.refusals.items())]
        return missing

    def line(self, target: Target) -> str:
        parts = [f"{target.base}: {_phase(self.base, target.replicas)} pods"]
        parts += [f"{n}: {_phase(self.adapters.get(n, {}), target.replicas)}" for n in target.adapters]
        parts.append(f"endpoints {len(self.endpoints)}/{target.replicas}")
        if self.refusals:
            parts.append(f"{len(self.refusals)} not answering yet")
        return " | ".join(parts)


class NotServing(TimeoutError):
    """The target did not serve in time; the message names what was missing."""


def _phase(status: dict[str, Any], replicas: int) -> str:
    return f"{status.get('phase') or '-'} {status.get('readyReplicas') or 0}/{replicas}"


def observe(kubectl: Kubectl, target: Target, probe: bool) -> Observation:
    """Statuses and endpoints; with `probe`, also one tiny request per model and endpoint."""
    listed = json.loads(kubectl("get", "-n", target.namespace, "bmd,lora", "-o", "json"))
    base: dict[str, Any] = {}
    adapters: dict[str, dict[str, Any]] = {}
    for item in listed["items"]:
        name, status = item["metadata"]["name"], item.get("status") or {}
        if item["kind"] == "BaseModelDeployment" and name == target.base:
            base = {**status, "_generation": item["metadata"].get("generation")}
        elif item["kind"] == "LoraAdapter":
            adapters[name] = status
    addresses = ready_endpoints(kubectl, target)
    observation = Observation(base, adapters, addresses)
    if not probe or observation.missing(target):
        return observation
    refusals = {}
    for address in addresses:
        for model in (target.base, *target.adapters):
            why = refusal(address, model)
            if why:
                refusals[f"{model}@{address}"] = why
    return Observation(base, adapters, addresses, refusals)


def ready_endpoints(kubectl: Kubectl, target: Target) -> tuple[str, ...]:
    """`ip:port` of the Service's ready endpoints (EndpointSlices: the local cluster's pods have
    loopback IPs, which Endpoints objects refuse), as a Service proxy would pick them."""
    selector = f"kubernetes.io/service-name={target.base}"
    text = kubectl("get", "endpointslices", "-n", target.namespace, "-l", selector, "-o", "json")
    found = set()
    for item in json.loads(text)["items"]:
        port = (item.get("ports") or [{}])[0].get("port")
        for endpoint in item.get("endpoints") or []:
            if port and (endpoint.get("conditions") or {}).get("ready"):
                found.update(f"{address}:{port}" for address in endpoint["addresses"])
    return tuple(sorted(found))


def refusal(address: str, model: str) -> str | None:
    """None when `model` answers a one-token request on `address`, else why not."""
    body = {"model": model, "prompt": "hello", "max_tokens": 1, "temperature": 0}
    request = urllib.request.Request(
        f"http://{address}/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return None if reply.status == 200 else f"HTTP {reply.status}"
    except urllib.error.HTTPError as error:
        return f"HTTP {error.code}"  # 401 until the pod's mounted access Secret names the adapter
    except (urllib.error.URLError, OSError) as error:
        return type(getattr(error, "reason", error)).__name__


def wait_until_serving(
    kubectl: Kubectl, target: Target, timeout_s: float, report: Report = print, interval_s: float = 1.0
) -> tuple[str, ...]:
    """Poll until the target serves (see the module's docstring); its ready endpoints.

    Prints a line whenever what it sees changes; raises `NotServing` naming what is missing."""
    started, last = time.monotonic(), ""
    while True:
        observation = observe(kubectl, target, probe=True)
        missing = observation.missing(target)
        line = observation.line(target)
        if line != last:
            report(f"  [{time.monotonic() - started:5.1f}s] {line}")
            last = line
        if not missing:
            return observation.endpoints
        if time.monotonic() - started > timeout_s:
            raise NotServing(f"not serving after {timeout_s:.0f}s; waited for: " + "; ".join(missing))
        time.sleep(interval_s)
