"""The e2e suite's configuration: everything comes from the environment, so the same tests run
on the local cluster, kind and GKE.

    KUBECONFIG                 the cluster (required; the operator must already run there)
    LORAPLEX_E2E_ACCESS        endpoints (default: call the Service's ready endpoints directly,
                               the local cluster) or port-forward (kind, GKE)
    LORAPLEX_E2E_NAMESPACE     namespace to use (default: a fresh e2e-xxxx, deleted afterwards;
                               it must exist when given)
    LORAPLEX_E2E_MANIFESTS     a folder with base-model.yaml, adapters.yaml and adapter-live.yaml
                               (default: e2e/demo/ with the tiny Llama by local path, which only
                               pods of the local pod runner can read)
    LORAPLEX_E2E_ASSETS        where the default manifests' trained tiny models are cached
                               (default: the demo's, ~/.cache/loraplex/demo-assets)
    LORAPLEX_E2E_TIMEOUT       seconds to wait for Ready (default 600: real clusters pull images)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

DEMO_MANIFESTS = Path(__file__).parent / "demo"
MANIFEST_FILES = ("base-model.yaml", "adapters.yaml", "adapter-live.yaml")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: end-to-end against a cluster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


def _kubectl_binary() -> str:
    found = os.environ.get("LORAPLEX_E2E_KUBECTL") or shutil.which("kubectl")
    if found:
        return found
    from loraplex.localcluster.binaries import find_binary

    return str(find_binary("kubectl"))


@dataclass
class Kube:
    """kubectl against $KUBECONFIG in one namespace."""

    binary: str
    namespace: str

    def run(self, *args: str, input: str | None = None, check: bool = True) -> str:
        argv = [self.binary, "-n", self.namespace, *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    def apply(self, text: str) -> None:
        self.run("apply", "-f", "-", input=text)

    def status(self, kind: str, name: str) -> dict[str, Any]:
        text = self.run("get", kind, name, "-o", "json", check=False)
        return json.loads(text).get("status", {}) if text else {}

    def ready_endpoints(self, service: str) -> list[str]:
        """`ip:port` of the Service's ready endpoints (EndpointSlices: the local cluster's pods
        have loopback IPs, which Endpoints objects refuse)."""
        text = self.run("get", "endpointslices", "-l", f"kubernetes.io/service-name={service}", "-o", "json")
        found = []
        for item in json.loads(text)["items"]:
            port = item["ports"][0]["port"]
            for endpoint in item.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready"):
                    found += [f"{address}:{port}" for address in endpoint["addresses"]]
        return sorted(found)


@dataclass(frozen=True)
class Manifests:
    texts: dict[str, str]  # file name -> YAML

    def objects(self, name: str) -> list[dict[str, Any]]:
        return [doc for doc in yaml.safe_load_all(self.texts[name]) if doc]

    def names(self, name: str) -> list[str]:
        return [doc["metadata"]["name"] for doc in self.objects(name)]

    @property
    def base_model(self) -> str:
        return self.names("base-model.yaml")[0]


@pytest.fixture(scope="session")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> Manifests:
    folder = os.environ.get("LORAPLEX_E2E_MANIFESTS")
    if folder:
        return Manifests({name: (Path(folder) / name).read_text() for name in MANIFEST_FILES})
    from loraplex.localcluster.demo_workload import build_workload, manifest

    assets = os.environ.get("LORAPLEX_E2E_ASSETS")
    workload = build_workload(Path(assets) if assets else None)
    return Manifests({name: manifest(name, workload) for name in MANIFEST_FILES})


@pytest.fixture(scope="session")
def kube() -> Iterator[Kube]:
    if not os.environ.get("KUBECONFIG"):
        pytest.fail(
            "the e2e suite needs KUBECONFIG (and the operator running in that cluster)", pytrace=False
        )
    binary, given = _kubectl_binary(), os.environ.get("LORAPLEX_E2E_NAMESPACE")
    namespace = given or f"e2e-{uuid.uuid4().hex[:6]}"
    if not given:
        subprocess.run([binary, "create", "namespace", namespace], check=True, capture_output=True)
    yield Kube(binary, namespace)
    if not given:
        subprocess.run([binary, "delete", "namespace", namespace, "--wait=false"], capture_output=True)


class ServiceAccess:
    """Base URLs that reach the base model's Service: its endpoints, or a port-forward."""

    def __init__(self, kube: Kube, service: str, mode: str) -> None:
        self.kube, self.service, self.mode = kube, service, mode
        self._forward: subprocess.Popen[bytes] | None = None

    def urls(self) -> list[str]:
        if self.mode == "endpoints":
            return [f"http://{address}" for address in self.kube.ready_endpoints(self.service)]
        if self._forward is None or self._forward.poll() is not None:
            self._start_forward()
        return [f"http://127.0.0.1:{self._port}"]

    def _start_forward(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self._port = sock.getsockname()[1]
        remote = self.kube.run("get", "service", self.service, "-o", "jsonpath={.spec.ports[0].port}")
        argv = [self.kube.binary, "-n", self.kube.namespace, "port-forward", f"svc/{self.service}"]
        self._forward = subprocess.Popen([*argv, f"{self._port}:{remote}"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self._port)) == 0:
                    return
            time.sleep(0.2)
        raise AssertionError("kubectl port-forward did not open its port")

    def close(self) -> None:
        if self._forward is not None:
            self._forward.terminate()
            self._forward.wait(timeout=10)


@pytest.fixture(scope="session")
def access(kube: Kube, manifests: Manifests) -> Iterator[ServiceAccess]:
    mode = os.environ.get("LORAPLEX_E2E_ACCESS", "endpoints")
    if mode not in ("endpoints", "port-forward"):
        pytest.fail(f"LORAPLEX_E2E_ACCESS must be endpoints or port-forward, not {mode!r}", pytrace=False)
    service = ServiceAccess(kube, manifests.base_model, mode)
    yield service
    service.close()


@pytest.fixture(scope="session")
def timeout_s() -> float:
    return float(os.environ.get("LORAPLEX_E2E_TIMEOUT", "600"))
