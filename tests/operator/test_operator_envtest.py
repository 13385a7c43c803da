"""The operator against a real kube-apiserver + controller-manager (no pod runner: pods stay
Pending, so this checks rendering, admission and status wiring, not adapter loading)."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner
from kubernetes import client
from operator_kubelet import LocalKubelet

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import wait_until
from loraplex.operator import crdgen
from loraplex.server.app import create_app
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.demo_assets import TinyAssets
from loraplex.server.engine import EngineConfig
from loraplex.server.routes.context import ServerSettings

pytestmark = pytest.mark.envtest
GROUP, VERSION = "loraplex.dev", "v1alpha1"


@pytest.fixture(scope="module")
def crds(local_cluster: LocalCluster) -> None:
    with local_cluster.api_client() as api:
        extensions = client.ApiextensionsV1Api(api)
        for crd in crdgen.all_crds(cel=False).values():  # 1.20 has no CEL
            local_cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))

            def established(name: str = crd["metadata"]["name"]) -> bool:
                conditions = extensions.read_custom_resource_definition(name).status.conditions or []
                return any(c.type == "Established" and c.status == "True" for c in conditions)

            assert wait_until(established, timeout=30)


@pytest.fixture
def namespace(local_cluster: LocalCluster, crds: None) -> Iterator[str]:
    name = f"op-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
def objects(local_cluster: LocalCluster) -> Iterator[client.CustomObjectsApi]:
    with local_cluster.api_client() as api:
        yield client.CustomObjectsApi(api)


def _apply(cluster: LocalCluster, namespace: str, manifest: str) -> None:
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def _get(objects: client.CustomObjectsApi, namespace: str, plural: str, name: str) -> dict[str, Any]:
    return objects.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)


def _condition(body: dict[str, Any], condition_type: str) -> dict[str, Any]:
    conditions = body.get("status", {}).get("conditions", [])
    return next((item for item in conditions if item["type"] == condition_type), {})


def _operator(namespace: str) -> KopfRunner:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    return KopfRunner(args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"})


BASE = """
apiVersion: loraplex.dev/v1alpha1
kind: BaseModelDeployment
metadata: {name: gemma}
spec:
  model: {id: google/gemma-2-2b-it}
  replicas: 2
"""
ADAPTERS = """
apiVersion: loraplex.dev/v1alpha1
kind: LoraAdapter
metadata: {name: sql}
spec: {baseModel: {name: gemma}, source: {uri: hf://org/sql}}
---
apiVersion: loraplex.dev/v1alpha1
kind: LoraAdapter
metadata: {name: keep}
spec: {baseModel: {name: gemma}, source: {uri: hf://org/keep}, deletionPolicy: Orphan}
---
apiVersion: loraplex.dev/v1alpha1
kind: LoraAdapter
metadata: {name: lost}
spec: {baseModel: {name: missing}, source: {uri: hf://org/lost}}
"""


def test_operator_renders_admits_and_reports(
    local_cluster: LocalCluster, namespace: str, objects: client.CustomObjectsApi
) -> None:
    with local_cluster.api_client() as api, _operator(namespace) as runner:
        apps, core = client.AppsV1Api(api), client.CoreV1Api(api)
        _apply(local_cluster, namespace, BASE)
        _apply(local_cluster, namespace, ADAPTERS)

        def phase(plural: str, name: str) -> str | None:
            return _get(objects, namespace, plural, name).get("status", {}).get("phase")

        assert wait_until(lambda: phase("basemodeldeployments", "gemma") == "Provisioning", timeout=30)
        deployment = apps.read_namespaced_deployment("gemma", namespace)
        assert deployment.metadata.owner_references[0].kind == "BaseModelDeployment"
        assert core.read_namespaced_service("gemma", namespace).spec.ports[0].port == 8080
        assert wait_until(lambda: len(core.list_namespaced_pod(namespace).items) == 2, timeout=30)

        def configmap_names() -> list[str]:
            text = core.read_namespaced_config_map("gemma-adapters", namespace).data["adapters.json"]
            return [entry["name"] for entry in yaml.safe_load(text)]

        assert wait_until(lambda: configmap_names() == ["keep", "sql"], timeout=30), configmap_names()
        assert wait_until(
            lambda: _condition(_get(objects, namespace, "loraadapters", "sql"), "Accepted"), timeout=30
        )
        sql = _get(objects, namespace, "loraadapters", "sql")
        assert _condition(sql, "Accepted")["status"] == "True"
        assert sql["status"]["desiredReplicas"] == 2 and sql["status"]["phase"] == "Pending"
        assert (
            _condition(_get(objects, namespace, "loraadapters", "lost"), "Accepted")["reason"]
            == "BaseModelNotFound"
        )

        bmd = _get(objects, namespace, "basemodeldeployments", "gemma")
        assert (
            bmd["status"]["selector"]
            == "app.kubernetes.io/instance=gemma,app.kubernetes.io/name=loraplex-server"
        )
        assert bmd["status"]["adapters"]["desired"] == 2

        local_cluster.kubectl("scale", "-n", namespace, "bmd/gemma", "--replicas=3")
        assert wait_until(
            lambda: apps.read_namespaced_deployment("gemma", namespace).spec.replicas == 3, timeout=30
        )

        patch = '{"spec": {"baseModel": {"name": "other"}}}'
        local_cluster.kubectl("patch", "-n", namespace, "lora/sql", "--type=merge", "-p", patch)
        assert wait_until(
            lambda: (
                _condition(_get(objects, namespace, "loraadapters", "sql"), "Accepted").get("reason")
                == "BaseModelImmutable"
            ),
            timeout=30,
        )
        assert wait_until(lambda: configmap_names() == ["keep"], timeout=30)

        def warnings() -> set[str]:
            events = core.list_namespaced_event(namespace, field_selector="involvedObject.name=sql").items
            return {event.reason for event in events if event.type == "Warning"}

        assert wait_until(lambda: "BaseModelImmutable" in warnings(), timeout=30), warnings()

        # The base goes: its adapters say so, and an Unload adapter then deletes without waiting.
        local_cluster.kubectl("delete", "-n", namespace, "bmd/gemma")

        def sql_reason() -> str | None:
            return _condition(_get(objects, namespace, "loraadapters", "sql"), "Accepted").get("reason")

        assert wait_until(lambda: sql_reason() == "BaseModelNotFound", timeout=30), sql_reason()
        local_cluster.kubectl("delete", "-n", namespace, "lora/sql", "--timeout=30s")
    assert runner.exception is None, runner.output

    # Operator stopped: an Orphan adapter still deletes at once (no finalizer deadlock).
    assert "finalizers" not in _get(objects, namespace, "loraadapters", "keep")["metadata"]
    local_cluster.kubectl("delete", "-n", namespace, "lora/keep", "--timeout=10s")


def test_rules_the_old_api_server_cannot_check_become_conditions(
    local_cluster: LocalCluster, namespace: str, objects: client.CustomObjectsApi
) -> None:
    bad = BASE.replace("replicas: 2", "replicas: 2\n  autoscaling: {minReplicas: 3, maxReplicas: 2}")
    with _operator(namespace) as runner:
        _apply(local_cluster, namespace, bad)  # 1.20 has no CEL: the API server takes it

        def ready_reason() -> str | None:
            return _condition(_get(objects, namespace, "basemodeldeployments", "gemma"), "Ready").get(
                "reason"
            )

        assert wait_until(lambda: ready_reason() == "InvalidSpec", timeout=30), ready_reason()
        bmd = _get(objects, namespace, "basemodeldeployments", "gemma")
        assert bmd["status"]["phase"] == "Failed"
        assert "minReplicas" in _condition(bmd, "Ready")["message"]
    assert runner.exception is None, runner.output


def test_adapters_hot_load_into_running_pods_and_status_tells_the_truth(
    local_cluster: LocalCluster, namespace: str, objects: client.CustomObjectsApi, tiny_assets: TinyAssets
) -> None:
    dirs = tiny_assets.adapters["llama"]

    def make_app() -> tuple[Any, Any]:
        # Rank limit 8: the rank-16 adapter is refused by the engine, with its own reason.
        engine = AsyncEngine.from_config(
            EngineConfig(model_path=str(tiny_assets.models["llama"]), max_lora_rank=8)
        )
        return create_app(engine, ServerSettings()), engine

    def lora(name: str, source: str) -> str:
        return (
            f"apiVersion: loraplex.dev/v1alpha1\nkind: LoraAdapter\nmetadata: {{name: {name}}}\n"
            f"spec: {{baseModel: {{name: gemma}}, source: {{uri: 'file://{dirs[source]}'}}}}"
        )

    adapters = "\n---\n".join(
        lora(name, source) for name, source in (("sql", "a4"), ("chat", "b8"), ("big", "c16"))
    )
    selector = "app.kubernetes.io/instance=gemma"

    def status(plural: str, name: str) -> dict[str, Any]:
        return _get(objects, namespace, plural, name).get("status", {})

    def converged(replicas: int) -> bool:
        sql, chat, big = (status("loraadapters", n) for n in ("sql", "chat", "big"))
        return (
            sql.get("phase") == chat.get("phase") == "Ready"
            and sql.get("readyReplicas") == chat.get("readyReplicas") == replicas
            and big.get("phase") == "Failed"
            and status("basemodeldeployments", "gemma").get("readyReplicas") == replicas
        )

    def served(kubelet: LocalKubelet, pod: str) -> dict[str, int]:
        """Adapter -> load generation, as the pod's engine reports it."""
        return {a.name: a.load_generation for a in kubelet.engine(pod).list_adapters() if a.state == "ready"}

    with local_cluster.api_client() as api, LocalKubelet(api, namespace, selector, make_app) as kubelet:
        with _operator(namespace) as runner:
            _apply(local_cluster, namespace, BASE)
            _apply(local_cluster, namespace, adapters)
            assert wait_until(lambda: converged(2), timeout=90), [
                status("loraadapters", n) for n in ("sql", "big")
            ]
            for pod in kubelet.servers:  # the pods are the truth: each one serves both adapters
                assert set(served(kubelet, pod)) == {"sql", "chat"}
            big = _get(objects, namespace, "loraadapters", "big")
            refusal = _condition(big, "RankExceedsBase") or _condition(big, "InvalidAdapter")
            assert "rank" in refusal["message"]
            bmd = status("basemodeldeployments", "gemma")
            assert (bmd["phase"], bmd["adapters"]) == ("Ready", {"desired": 3, "ready": 2, "failed": 1})
            assert all(pod["adaptersLoaded"] == 2 for pod in bmd["pods"])
            assert status("loraadapters", "sql")["resolved"]["rank"] == 4

            # A new adapter hot-loads while the pods keep serving: no pod leaves the Service.
            _apply(local_cluster, namespace, lora("extra", "a4"))
            assert wait_until(lambda: status("loraadapters", "extra").get("readyReplicas") == 2, timeout=60)
            assert all(
                history[history.index(True) :].count(False) == 0 for history in kubelet.readiness.values()
            )

            # A crashed and restarted server comes back empty: the operator reloads it (new epoch).
            pod = sorted(kubelet.servers)[0]
            kubelet.restart(pod)

            def reloaded() -> bool:
                body = client.CoreV1Api(api).read_namespaced_pod(pod, namespace)
                gate = next(c for c in body.status.conditions if c.type == "loraplex.dev/adapters-ready")
                return (
                    set(served(kubelet, pod)) == {"sql", "chat", "extra"}
                    and gate.status == "True"
                    and gate.message.startswith("engine epoch 1@")
                )

            def gate_and_adapters() -> tuple[Any, set[str]]:
                body = client.CoreV1Api(api).read_namespaced_pod(pod, namespace)
                return body.status.conditions, set(served(kubelet, pod))

            assert wait_until(reloaded, timeout=60), gate_and_adapters()
            assert wait_until(lambda: converged(2), timeout=30)
        assert runner.exception is None, runner.output

        # A restarted operator reloads nothing: the pods still hold every adapter.
        before = {pod: served(kubelet, pod) for pod in kubelet.servers}
        with _operator(namespace) as runner:
            # Scale up: the new pod turns Ready only with every adapter loaded.
            local_cluster.kubectl("scale", "-n", namespace, "bmd/gemma", "--replicas=3")
            assert wait_until(lambda: converged(3), timeout=60)
            assert {pod: served(kubelet, pod) for pod in before} == before  # nothing reloaded on the others
            (new_pod,) = set(kubelet.servers) - set(before)
            assert kubelet.ready_with[new_pod] == {"sql", "chat", "extra"}

            # Unload policy: the delete returns only once no pod serves the adapter.
            local_cluster.kubectl("delete", "-n", namespace, "lora/sql", "--timeout=60s")
            for pod in kubelet.servers:
                assert "sql" not in served(kubelet, pod)
        assert runner.exception is None, runner.output
