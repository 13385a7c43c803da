"""loraplex end to end on whatever cluster KUBECONFIG names (local, kind, GKE): deploy a base
model and its adapters, wait for Ready, generate with each adapter through the Service,
hot-load one more, delete one. The tests run in file order on one deployment."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from conftest import Kube, Manifests, ServiceAccess

QUESTION, MAX_NEW = "How many orders shipped last week?", 24


def wait_for(predicate: Callable[[], bool], timeout_s: float, what: Callable[[], Any]) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f}s: {what()}", pytrace=False)
        time.sleep(2)


def generate(url: str, adapter: str | None) -> tuple[int, str]:
    """One greedy chat answer from `adapter` (None: the base, by its served name) and the status."""
    model = adapter or _served_base(url)
    messages = [{"role": "user", "content": QUESTION}]
    body = {"model": model, "messages": messages, "max_tokens": MAX_NEW, "temperature": 0}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as reply:
            return reply.status, json.loads(reply.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")


def _served_base(url: str) -> str:
    with urllib.request.urlopen(f"{url}/info", timeout=30) as reply:
        return json.loads(reply.read())["model_id"]


def generate_once_open(url: str, adapter: str, timeout_s: float = 120) -> tuple[int, str]:
    """`generate`, retried while the pod answers 401: a pod takes a new adapter's access entry
    from a mounted Secret, which kubelet refreshes some time after the adapter is loaded."""
    deadline = time.monotonic() + timeout_s
    while (answer := generate(url, adapter))[0] == 401 and time.monotonic() < deadline:
        time.sleep(1)
    return answer


def adapters_ready(kube: Kube, names: list[str], replicas: int) -> Callable[[], bool]:
    def check() -> bool:
        statuses = [kube.status("loraadapter", name) for name in names]
        return all(s.get("phase") == "Ready" and s.get("readyReplicas") == replicas for s in statuses)

    return check


def replicas(manifests: Manifests) -> int:
    return manifests.objects("base-model.yaml")[0]["spec"].get("replicas", 1)


@pytest.fixture(scope="module")
def deployed(kube: Kube, manifests: Manifests, timeout_s: float) -> list[str]:
    """The base model and its adapters applied and Ready on every replica; the adapter names."""
    kube.apply(manifests.texts["base-model.yaml"])
    kube.apply(manifests.texts["adapters.yaml"])
    names = manifests.names("adapters.yaml")
    statuses = lambda: {name: kube.status("loraadapter", name) for name in names}  # noqa: E731
    wait_for(adapters_ready(kube, names, replicas(manifests)), timeout_s, statuses)

    def base_ready() -> bool:
        bmd = kube.status("basemodeldeployment", manifests.base_model)
        return (bmd.get("phase"), bmd.get("readyReplicas")) == ("Ready", replicas(manifests))

    wait_for(base_ready, 60, lambda: kube.status("basemodeldeployment", manifests.base_model))
    return names


def test_base_model_and_adapters_become_ready(kube: Kube, manifests: Manifests, deployed: list[str]) -> None:
    bmd = kube.status("basemodeldeployment", manifests.base_model)
    assert bmd["adapters"]["ready"] == len(deployed)
    assert all(pod["adaptersLoaded"] == len(deployed) for pod in bmd["pods"]), bmd["pods"]


def test_each_adapter_answers_through_the_service(access: ServiceAccess, deployed: list[str]) -> None:
    answers: dict[str | None, set[str]] = {}
    for url in access.urls():
        for adapter in (None, *deployed):
            status, text = generate_once_open(url, adapter) if adapter else generate(url, None)
            assert status == 200, (url, adapter, text)
            answers.setdefault(adapter, set()).add(text)
    assert all(len(texts) == 1 for texts in answers.values()), answers  # same answer on every pod
    assert len({next(iter(texts)) for texts in answers.values()}) > 1, answers  # adapters change it


def test_an_adapter_hot_loads_into_running_pods(
    kube: Kube, manifests: Manifests, access: ServiceAccess, deployed: list[str], timeout_s: float
) -> None:
    pods_before = kube.run("get", "pods", "-o", "jsonpath={.items[*].metadata.uid}").split()
    kube.apply(manifests.texts["adapter-live.yaml"])
    live = manifests.names("adapter-live.yaml")
    wait_for(
        adapters_ready(kube, live, replicas(manifests)),
        timeout_s,
        lambda: kube.status("loraadapter", live[0]),
    )
    for url in access.urls():
        assert generate_once_open(url, live[0])[0] == 200
    assert kube.run("get", "pods", "-o", "jsonpath={.items[*].metadata.uid}").split() == pods_before


def test_a_deleted_adapter_answers_404(kube: Kube, access: ServiceAccess, deployed: list[str]) -> None:
    gone = deployed[0]
    kube.run("delete", "loraadapter", gone, "--timeout=120s")
    for url in access.urls():
        assert generate(url, gone)[0] == 404
        assert generate(url, deployed[1])[0] == 200
