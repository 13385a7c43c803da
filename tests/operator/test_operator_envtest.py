"""The operator against a real kube-apiserver + controller-manager, its pods run by the local pod
runner as real `loraplex serve` processes on the tiny Llama (issue 7's done-when).

The tests after `test_every_adapter_is_ready_on_every_pod` share one BaseModelDeployment and
run in file order: each one starts from the state the one before left.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kopf.testing import KopfRunner
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.demo_workload import Workload, build_workload, manifest
from loraplex.localcluster.pod_runner import PodRunner
from loraplex.localcluster.processes import wait_until

pytestmark = pytest.mark.envtest
GROUP, VERSION = "loraplex.dev", "v1alpha1"
BASE, SELECTOR = "tiny-llama", "app.kubernetes.io/instance=tiny-llama"
GOOD = {
    "sql": "sql",
    "support": "support",
    "poem": "poem",
}  # adapter -> workload key (e2e/demo/adapters.yaml)
# A chat turn as the template renders it: the trained fine-tunes answer it each in their style.
PROMPT, MAX_NEW = "<|bos|><|user|>\nHow many orders shipped last week?<|end|>\n<|assistant|>\n", 6


class Operator:
    """The kopf operator in this process, restartable (KopfRunner runs it in a thread)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.runner: KopfRunner | None = None

    def start(self) -> None:
        args = ["run", "--standalone", "--namespace", self.namespace, "-m", "loraplex.operator.handlers"]
        self.runner = KopfRunner(args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"})
        self.runner.__enter__()

    def stop(self) -> None:
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.__exit__(None, None, None)
            assert runner.exception is None, runner.output


@dataclass
class Live:
    """One namespace with the operator, the pod runner and the tiny-llama BaseModelDeployment."""

    cluster: LocalCluster
    namespace: str
    core: client.CoreV1Api
    objects: client.CustomObjectsApi
    runner: PodRunner
    operator: Operator
    workload: Workload

    def apply(self, text: str) -> None:
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input=text)

    def kubectl(self, *args: str) -> str:
        return self.cluster.kubectl(*args[:1], "-n", self.namespace, *args[1:]).stdout

    def status(self, plural: str, name: str) -> dict[str, Any]:
        body = self.objects.get_namespaced_custom_object(GROUP, VERSION, self.namespace, plural, name)
        return body.get("status", {})

    def adapter(self, name: str) -> dict[str, Any]:
        return self.status("loraadapters", name)

    def pods(self) -> list[client.V1Pod]:
        items = self.core.list_namespaced_pod(self.namespace, label_selector=SELECTOR).items
        return [pod for pod in items if not pod.metadata.deletion_timestamp]

    def url(self, pod: str) -> str:
        return f"http://{self.runner.worker(self.namespace, pod).ip}:8080"

    def served(self, pod: str) -> dict[str, int]:
        """Adapter -> load generation, as the pod's own server reports it."""
        _, body = http("GET", f"{self.url(pod)}/v1/adapters")
        return {a["name"]: a["load_generation"] for a in body["data"] if a["state"] == "ready"}

    def endpoint_ips(self) -> set[str]:
        """Addresses of the Service's ready endpoints. EndpointSlices, not Endpoints: the API
        server refuses loopback addresses in Endpoints (the slice controller fills both alike)."""
        text = self.kubectl("get", "endpointslices", "-l", f"kubernetes.io/service-name={BASE}", "-o", "json")
        slices = json.loads(text)["items"]
        return {
            address
            for item in slices
            for endpoint in item.get("endpoints") or []
            if (endpoint.get("conditions") or {}).get("ready")
            for address in endpoint["addresses"]
        }


def http(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def generate(url: str, adapter: str | None) -> tuple[int, Any]:
    parameters = {"max_new_tokens": MAX_NEW, **({"adapter_id": adapter} if adapter else {})}
    return http("POST", f"{url}/generate", {"inputs": PROMPT, "parameters": parameters})


def reference_text(workload: Workload, recipe: str) -> str:
    """Greedy continuation from transformers + peft: what the adapter must answer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(workload.model_dir)
    model = AutoModelForCausalLM.from_pretrained(workload.model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(model, str(workload.adapters[recipe])).eval()
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **ids, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def ready_everywhere(live: Live, names: list[str], replicas: int) -> Callable[[], bool]:
    def check() -> bool:
        statuses = [live.adapter(name) for name in names]
        return all(s.get("phase") == "Ready" and s.get("readyReplicas") == replicas for s in statuses)

    return check


def condition(status: dict[str, Any], condition_type: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions", []) if c["type"] == condition_type), {})


@pytest.fixture(scope="module")
def live(
    local_cluster: LocalCluster, crds: None, tmp_path_factory: pytest.TempPathFactory, trained_assets: Any
) -> Iterator[Live]:
    workload = build_workload(trained_assets.root.parent)
    namespace = f"live-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", namespace)
    state = Path(tmp_path_factory.mktemp("pods"))
    env = {"OMP_NUM_THREADS": "1", "LOG_FORMAT": "text", "LOG_LEVEL": "warning"}
    with (
        local_cluster.api_client() as api,
        PodRunner(api, state, (namespace,), SELECTOR, extra_env=env) as runner,
    ):
        operator = Operator(namespace)
        operator.start()
        try:
            yield Live(
                local_cluster,
                namespace,
                client.CoreV1Api(api),
                client.CustomObjectsApi(api),
                runner,
                operator,
                workload,
            )
        finally:
            operator.stop()
            local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def test_every_adapter_is_ready_on_every_pod_and_answers_its_own_text(live: Live) -> None:
    live.apply(manifest("base-model.yaml", live.workload))
    live.apply(manifest("adapters.yaml", live.workload))
    assert wait_until(ready_everywhere(live, list(GOOD), 2), timeout=120), [live.adapter(n) for n in GOOD]
    pods = [pod.metadata.name for pod in live.pods()]
    assert len(pods) == 2
    expected = {name: reference_text(live.workload, recipe) for name, recipe in GOOD.items()}
    assert len(set(expected.values())) == 3  # the adapters really differ
    for pod in pods:
        assert set(live.served(pod)) == set(GOOD)
        for name in GOOD:
            status, body = generate(live.url(pod), name)
            assert (status, body.get("generated_text")) == (200, expected[name]), (pod, name, body)

    def bmd() -> tuple[str | None, int | None]:
        status = live.status("basemodeldeployments", BASE)
        return status.get("phase"), status.get("readyReplicas")

    assert wait_until(lambda: bmd() == ("Ready", 2), timeout=30), bmd()
    ips = {live.runner.worker(live.namespace, pod).ip for pod in pods}
    assert wait_until(lambda: live.endpoint_ips() == ips, timeout=10), live.endpoint_ips()
    from loraplex.operator.explain import explain  # what a user runs to see why (not) Ready

    text = explain(live.namespace, BASE)
    assert f"adapter {live.namespace}/sql: Ready 2/2" in text and "base: Ready, readyReplicas 2" in text
    assert all(f"pod {pod}: running=True ready=True" in text for pod in pods), text


def test_bad_adapters_fail_with_the_engines_reason_and_the_others_stay_ready(live: Live) -> None:
    bad = (
        ("too-big", f"file://{live.workload.adapters['r32']}"),
        ("missing", f"file://{live.workload.model_dir.parent}/no-such-adapter"),
    )
    for name, uri in bad:
        live.apply(
            f"apiVersion: {GROUP}/{VERSION}\nkind: LoraAdapter\nmetadata: {{name: {name}}}\n"
            f"spec: {{baseModel: {{name: {BASE}}}, source: {{uri: '{uri}'}}}}"
        )

    def failed() -> bool:
        return all(live.adapter(name).get("phase") == "Failed" for name, _ in bad)

    assert wait_until(failed, timeout=60), [live.adapter(name) for name, _ in bad]
    assert "rank" in condition(live.adapter("too-big"), "RankExceedsBase")["message"]
    assert "no-such-adapter" in condition(live.adapter("missing"), "SourceUnavailable")["message"]
    assert ready_everywhere(live, list(GOOD), 2)()
    live.kubectl("delete", "lora/too-big", "lora/missing", "--timeout=60s")


def test_a_fourth_adapter_hot_loads_while_requests_run(live: Live) -> None:
    before = {pod.metadata.name: pod.status.container_statuses[0].restart_count for pod in live.pods()}
    urls = [live.url(pod) for pod in before]
    serving = live.endpoint_ips()
    results: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        while not stop.is_set():
            results.extend(generate(url, "sql")[0] for url in urls)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        live.apply(manifest("adapter-live.yaml", live.workload))

        def loaded_and_still_serving() -> bool:
            assert live.endpoint_ips() == serving  # no pod leaves the Service for a hot-load
            return ready_everywhere(live, ["haiku"], 2)()

        assert wait_until(loaded_and_still_serving, timeout=60), live.adapter("haiku")
    finally:
        stop.set()
        thread.join()
    assert results and set(results) == {200}
    after = {pod.metadata.name: pod.status.container_statuses[0].restart_count for pod in live.pods()}
    assert after == before  # same pods, no container restart
    expected = (200, {"generated_text": reference_text(live.workload, "haiku")})
    for url in urls:  # 401 until the pod's mounted access Secret names the new adapter
        answered = wait_until(lambda url=url: generate(url, "haiku") == expected, timeout=30)
        assert answered, generate(url, "haiku")


def test_a_crashed_server_is_restarted_and_reloaded_before_it_takes_traffic(live: Live) -> None:
    names = [*GOOD, "haiku"]
    pod = sorted(p.metadata.name for p in live.pods())[0]
    ip = live.runner.worker(live.namespace, pod).ip
    assert ip in live.endpoint_ips()
    live.runner.kill(live.namespace, pod)
    dipped, left_endpoints = False, False

    def back() -> bool:
        nonlocal dipped, left_endpoints
        dipped |= live.adapter("sql").get("readyReplicas") != 2
        in_endpoints = ip in live.endpoint_ips()
        left_endpoints |= not in_endpoints
        if in_endpoints and left_endpoints:  # back in the Service: every adapter is loaded
            assert set(live.served(pod)) >= set(names)
            return True
        return False

    assert wait_until(back, timeout=90, interval=0.2)
    status = live.core.read_namespaced_pod(pod, live.namespace).status
    assert status.container_statuses[0].restart_count == 1
    gate = next(c for c in status.conditions if c.type == "loraplex.dev/adapters-ready")
    assert gate.status == "True" and gate.message.startswith("engine epoch 1@")
    assert dipped, "the adapters' readyReplicas never showed the crashed pod"
    assert wait_until(ready_everywhere(live, names, 2), timeout=30)


def test_a_restarted_operator_reloads_nothing_and_a_new_pod_is_ready_only_when_loaded(live: Live) -> None:
    names = [*GOOD, "haiku"]
    live.operator.stop()
    before = {pod.metadata.name: live.served(pod.metadata.name) for pod in live.pods()}
    live.operator.start()
    live.kubectl("scale", "bmd/tiny-llama", "--replicas=3")
    seen_ready_with: dict[str, set[str]] = {}

    def scaled() -> bool:
        for pod in live.pods():
            name = pod.metadata.name
            ready = any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
            if name not in before and ready and name not in seen_ready_with:
                seen_ready_with[name] = set(live.served(name))
        return bool(seen_ready_with) and ready_everywhere(live, names, 3)()

    assert wait_until(scaled, timeout=120, interval=0.2), [live.adapter(n) for n in names]
    assert {pod: live.served(pod) for pod in before} == before  # nothing reloaded
    assert len(seen_ready_with) == 1 and set(names) <= next(iter(seen_ready_with.values()))


def test_a_deleted_adapter_is_unloaded_from_every_pod(live: Live) -> None:
    live.kubectl("delete", "lora/sql", "--timeout=60s")  # Unload: returns once no pod serves it
    for pod in live.pods():
        assert "sql" not in live.served(pod.metadata.name)
        assert generate(live.url(pod.metadata.name), "sql")[0] == 404


def test_an_orphan_adapter_deletes_at_once_with_the_operator_stopped(live: Live) -> None:
    live.operator.stop()
    try:
        body = live.objects.get_namespaced_custom_object(
            GROUP, VERSION, live.namespace, "loraadapters", "haiku"
        )
        assert "finalizers" not in body["metadata"]
        live.kubectl("delete", "lora/haiku", "--timeout=10s")
    finally:
        live.operator.start()


def test_scaling_down_stops_the_removed_pods_process(live: Live) -> None:
    workers = {
        pod.metadata.name: live.runner.worker(live.namespace, pod.metadata.name) for pod in live.pods()
    }
    live.kubectl("scale", "bmd/tiny-llama", "--replicas=2")
    assert wait_until(lambda: len(live.pods()) == 2, timeout=60)
    (gone,) = set(workers) - {pod.metadata.name for pod in live.pods()}
    assert wait_until(lambda: workers[gone].finished.is_set(), timeout=90)
    assert workers[gone].process is None  # SIGTERM (then SIGKILL after the grace period) reaped it

    def pod_names() -> set[str]:
        return {pod.metadata.name for pod in live.core.list_namespaced_pod(live.namespace).items}

    # The runner finishes the delete once the process is gone (kubelet's part of it).
    assert wait_until(lambda: gone not in pod_names(), timeout=30), pod_names()
