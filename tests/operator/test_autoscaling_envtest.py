"""spec.autoscaling against a real kube-apiserver (1.20: autoscaling/v2beta2, picked by discovery):
the HPA is accepted and targets the BMD's scale subresource, and `kubectl scale bmd` moves the
Deployment through spec.replicas (one source of replicas). Then replicas 1 -> 3 -> 1 through the
scale subresource with real `loraplex serve` pods (the local pod runner) under load from
bench/serve.py: no request fails, and a pod joins the endpoints only with every adapter loaded.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import string
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from kopf.testing import KopfRunner
from kubernetes import client

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.demo_workload import build_workload, manifest
from loraplex.localcluster.pod_runner import PodRunner
from loraplex.localcluster.processes import wait_until

pytestmark = pytest.mark.envtest
GROUP, VERSION, PLURAL = "loraplex.dev", "v1alpha1", "basemodeldeployments"

BASE = """
apiVersion: loraplex.dev/v1alpha1
kind: BaseModelDeployment
metadata: {name: gemma}
spec:
  model: {id: google/gemma-2-2b-it}
  replicas: 1
  autoscaling: {minReplicas: 1, maxReplicas: 4, metric: runningRequests, target: 8,
                scaleDownStabilizationSeconds: 120}
"""


@pytest.fixture
def namespace(local_cluster: LocalCluster, crds: None) -> Iterator[str]:
    name = f"hpa-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


def _operator(namespace: str) -> KopfRunner:
    args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    return KopfRunner(args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"})


def _hpa(cluster: LocalCluster, namespace: str) -> dict | None:
    result = cluster.kubectl(
        "get", "horizontalpodautoscalers.v2beta2.autoscaling", "gemma", "-n", namespace, "-o", "json",
        check=False,
    )  # fmt: skip
    return json.loads(result.stdout) if result.returncode == 0 else None


def test_hpa_targets_the_scale_subresource_and_kubectl_scale_moves_the_deployment(
    local_cluster: LocalCluster, namespace: str
) -> None:
    with local_cluster.api_client() as api, _operator(namespace) as runner:
        apps, objects = client.AppsV1Api(api), client.CustomObjectsApi(api)
        local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=BASE)
        assert wait_until(lambda: _hpa(local_cluster, namespace) is not None, timeout=60)
        hpa = _hpa(local_cluster, namespace)
        target = hpa["spec"]["scaleTargetRef"]
        assert target == {"apiVersion": f"{GROUP}/{VERSION}", "kind": "BaseModelDeployment", "name": "gemma"}
        assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == "vllm:num_requests_running"
        assert hpa["spec"]["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 120
        assert hpa["metadata"]["ownerReferences"][0]["kind"] == "BaseModelDeployment"

        # What the HPA controller reads and writes: the BMD's scale subresource.
        scale = objects.get_namespaced_custom_object_scale(GROUP, VERSION, namespace, PLURAL, "gemma")
        assert scale["spec"]["replicas"] == 1

        def deployment_replicas() -> int | None:
            try:
                return apps.read_namespaced_deployment("gemma", namespace).spec.replicas
            except client.ApiException:
                return None

        assert wait_until(lambda: deployment_replicas() == 1, timeout=60)
        local_cluster.kubectl("scale", "bmd", "gemma", "-n", namespace, "--replicas=3")
        bmd = objects.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gemma")
        assert bmd["spec"]["replicas"] == 3
        assert wait_until(lambda: deployment_replicas() == 3, timeout=60)
        local_cluster.kubectl("scale", "bmd", "gemma", "-n", namespace, "--replicas=1")
        assert wait_until(lambda: deployment_replicas() == 1, timeout=60)

        # Autoscaling off: the HPA goes, the replicas stay where they are.
        patch = {"spec": {"autoscaling": None}}
        objects.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "gemma", patch)
        assert wait_until(lambda: _hpa(local_cluster, namespace) is None, timeout=60)
        assert deployment_replicas() == 1
    assert runner.exception is None


TINY = """
apiVersion: loraplex.dev/v1alpha1
kind: BaseModelDeployment
metadata: {name: tiny-llama}
spec:
  model: {id: "file://${MODEL_DIR}"}
  replicas: 1
  engine: {maxLoraRank: 16}
  resources: {cpu: "1", memory: 2Gi, ephemeralStorage: 2Gi}
  autoscaling: {minReplicas: 1, maxReplicas: 3, metric: queueDepth, target: 2}
"""
TINY_SELECTOR = "app.kubernetes.io/instance=tiny-llama"
ADAPTERS = {"sql", "support", "poem"}  # e2e/demo/adapters.yaml
POD_ENV = {"OMP_NUM_THREADS": "1", "LOG_FORMAT": "text", "LOG_LEVEL": "warning"}


def _bench_serve() -> ModuleType:
    """bench/serve.py, the load generator (bench/ is not a package)."""
    path = Path(__file__).resolve().parents[2] / "bench" / "serve.py"
    spec = importlib.util.spec_from_file_location("loraplex_bench_serve", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


class Router:
    """What the Service does: each request goes to one ready pod (round robin, refreshed every
    0.2 s). Notes when each address joined and which
    adapters its server reported ready at that moment."""

    def __init__(self, core: client.CoreV1Api, namespace: str, selector: str) -> None:
        self.core, self.namespace, self.selector = core, namespace, selector
        self.ips: list[str] = []
        self.joined: dict[str, tuple[float, set[str]]] = {}  # ip -> (time.time(), adapters)
        self.pods: dict[str, client.V1Pod] = {}  # ip -> the pod when first seen ready
        self._turn = itertools.count()
        self.session: aiohttp.ClientSession | None = None

    def ready_ips(self) -> list[str]:
        """The endpoints controller's choice: Ready pods not being deleted. (It can't publish our
        loopback pod IPs: the API server refuses them in Endpoints, so the router asks the pods.)"""
        pods = self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items
        ready = {
            pod.status.pod_ip: pod
            for pod in pods
            if pod.metadata.deletion_timestamp is None
            and pod.status.pod_ip
            and any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])
        }
        self.pods.update(ready)
        return sorted(ready)

    async def refresh(self) -> None:
        ips = await asyncio.to_thread(self.ready_ips)
        for ip in [ip for ip in ips if ip not in self.joined]:
            self.joined[ip] = (time.time(), await self._adapters(ip))
        self.ips = ips

    async def follow(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            await self.refresh()

    async def _adapters(self, ip: str) -> set[str]:
        assert self.session is not None
        async with self.session.get(f"http://{ip}:8080/v1/adapters") as reply:
            body = await reply.json()
        return {item["name"] for item in body["data"] if item["state"] == "ready"}

    async def forward(self, request: web.Request) -> web.StreamResponse:
        if not self.ips or self.session is None:
            return web.json_response({"error": "no ready endpoint"}, status=503)
        ip = self.ips[next(self._turn) % len(self.ips)]
        url = f"http://{ip}:8080{request.path_qs}"
        headers = {"Content-Type": request.content_type}
        async with self.session.request(
            request.method, url, data=await request.read(), headers=headers
        ) as up:
            response = web.StreamResponse(status=up.status)
            response.content_type = up.content_type
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response


class Load:
    """bench/serve.py's closed loop, batch after batch through the router, until stopped."""

    def __init__(self, router: Router) -> None:
        self.router, self.bench = router, _bench_serve()
        self.results: list[Any] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.router.forward)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        async with aiohttp.ClientSession() as session:
            self.router.session = session
            await self.router.refresh()  # the pods ready now, before the first request
            follower = asyncio.create_task(self.router.follow())
            spec = self.bench.LoadSpec(
                url=f"http://127.0.0.1:{port}", api="tgi", adapters=tuple(sorted(ADAPTERS)),
                num_requests=12, concurrency=3, rate=None, prompt_words=(2, 6), output_tokens=(4, 12),
                zipf=None, seed=0, timeout_s=60.0,
            )  # fmt: skip
            for batch in itertools.count():
                if self.stop.is_set():
                    break
                results, _ = await self.bench.run_load(replace(spec, seed=batch))
                self.results += results
            follower.cancel()
        await runner.cleanup()


def test_replicas_1_3_1_under_load_lose_no_request(
    local_cluster: LocalCluster, namespace: str, trained_assets: Any, tmp_path: Path
) -> None:
    workload = build_workload(trained_assets.root.parent)
    with (
        local_cluster.api_client() as api,
        PodRunner(api, tmp_path / "pods", (namespace,), TINY_SELECTOR, extra_env=POD_ENV),
        _operator(namespace) as operator,
    ):
        core = client.CoreV1Api(api)
        local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest_text(TINY, workload))
        local_cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest("adapters.yaml", workload))
        router = Router(core, namespace, TINY_SELECTOR)
        assert wait_until(lambda: len(router.ready_ips()) == 1, timeout=90), _explain(core, namespace)
        load = Load(router)
        load.thread.start()
        assert wait_until(lambda: len(load.results) >= 12, timeout=60)

        scaled_up_at = time.time()
        local_cluster.kubectl("scale", "bmd", "tiny-llama", "-n", namespace, "--replicas=3")
        assert wait_until(lambda: len(router.ips) == 3, timeout=240)
        served_by_three = len(load.results)
        assert wait_until(lambda: len(load.results) >= served_by_three + 12, timeout=60)

        local_cluster.kubectl("scale", "bmd", "tiny-llama", "-n", namespace, "--replicas=1")
        pods = lambda: core.list_namespaced_pod(namespace, label_selector=TINY_SELECTOR).items  # noqa: E731
        assert wait_until(lambda: len(pods()) == 1 and len(router.ips) == 1, timeout=180)
        served_by_one = len(load.results)
        assert wait_until(lambda: len(load.results) >= served_by_one + 12, timeout=60)
        load.stop.set()
        load.thread.join(timeout=120)
    assert operator.exception is None
    failed = [(r.status, r.error, round(r.start_s, 1)) for r in load.results if not r.ok]
    assert not failed and len(load.results) >= 48, failed[:5]
    assert len(router.joined) == 3 and all(adapters == ADAPTERS for _, adapters in router.joined.values())
    joined = sorted(at - scaled_up_at for at, _ in router.joined.values() if at > scaled_up_at)
    print(f"scale-up 1 -> 3: new pods Ready with {len(ADAPTERS)} adapters after {joined} s")
    for ip, (at, _) in router.joined.items():
        if at > scaled_up_at:
            print(f"  pod {ip}: {_phases(router.pods[ip])}")
    assert len(joined) == 2


def manifest_text(template: str, workload: Any) -> str:
    return string.Template(template).substitute(workload.variables())


def _explain(core: client.CoreV1Api, namespace: str) -> str:
    """Pod conditions and the BMD's status, for a failed wait."""
    pods = core.list_namespaced_pod(namespace, label_selector=TINY_SELECTOR).items
    conditions = {p.metadata.name: [(c.type, c.status) for c in p.status.conditions or []] for p in pods}
    bmd = client.CustomObjectsApi(core.api_client).get_namespaced_custom_object(
        GROUP, VERSION, namespace, "basemodeldeployments", "tiny-llama"
    )
    return json.dumps({"pods": conditions, "status": bmd.get("status")}, default=str)[:3000]


def _phases(pod: client.V1Pod) -> dict[str, float]:
    """Seconds from the pod's creation to its process start and to Ready (1 s resolution)."""
    created = pod.metadata.creation_timestamp
    started = pod.status.container_statuses[0].state.running.started_at
    ready = next(c.last_transition_time for c in pod.status.conditions if c.type == "Ready")
    return {
        "process_started_s": (started - created).total_seconds(),
        "ready_s": (ready - created).total_seconds(),
    }
