"""A test-only stand-in for kubelet: runs a Deployment's pods as in-process servers (the real
app on the tiny Llama) on loopback addresses (port 8080) and publishes pod status as a kubelet would (podIP, a
running container, Ready = server /ready AND every readiness gate). The generic pod runner of
the local cluster replaces this for the e2e suites; here it keeps the operator envtest small.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from kubernetes import client

from loraplex.operator.render.network import CONTAINER_PORT

log = logging.getLogger(__name__)


class LocalKubelet:
    def __init__(
        self,
        api: client.ApiClient,
        namespace: str,
        selector: str,
        make_app: Callable[[], Any],
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace, self.selector, self.make_app = namespace, selector, make_app
        self.servers: dict[str, tuple[str, web.AppRunner, Any]] = {}  # pod -> (ip, runner, engine)
        # A loopback /24 of its own (127.0.0.0/8 is all local on Linux): pod IPs that no other
        # local runner in a parallel test uses, all on the pods' fixed port.
        self._subnet = f"127.{random.randint(64, 250)}.{random.randint(0, 255)}"
        self._next_ip = 2
        self._published: dict[str, tuple[str, bool, int]] = {}
        self.restarts: dict[str, int] = {}
        self.ready_with: dict[str, set[str]] = {}  # pod -> adapters it served when first published Ready
        self.readiness: dict[str, list[bool]] = {}  # pod -> every Ready value published, in order
        self._loop = asyncio.new_event_loop()
        self._stop = threading.Event()
        self._lock = threading.Lock()  # the poller and restart() both change `servers`
        self._threads = [
            threading.Thread(target=self._loop.run_forever, daemon=True),
            threading.Thread(target=self._poll_forever, daemon=True),
        ]

    def __enter__(self) -> LocalKubelet:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._threads[1].join(timeout=10)
        for name in list(self.servers):
            self._stop_server(name)
        self._loop.call_soon_threadsafe(self._loop.stop)

    def engine(self, pod: str) -> Any:
        return self.servers[pod][2]

    def restart(self, pod: str) -> None:
        """Kill the pod's server and start a fresh one on the same address (a container restart)."""
        with self._lock:
            ip = self.servers[pod][0]
            self._stop_server(pod)
            runner, engine = self._run(self._start_server(ip))
            self.servers[pod] = (ip, runner, engine)
            self.restarts[pod] = self.restarts.get(pod, 0) + 1

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def _poll_forever(self) -> None:
        while not self._stop.is_set():
            try:
                for pod in self.core.list_namespaced_pod(self.namespace, label_selector=self.selector).items:
                    with self._lock:
                        self._sync(pod)
            except Exception as error:  # keep publishing: one failed round must not stop the kubelet
                log.warning("local kubelet round failed: %r", error)
            time.sleep(0.2)

    def _sync(self, pod: client.V1Pod) -> None:
        name = pod.metadata.name
        if pod.metadata.deletion_timestamp:
            self._stop_server(name)
            self.core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=0)
            return
        if name not in self.servers:
            ip = f"{self._subnet}.{self._next_ip}"
            self._next_ip += 1
            runner, engine = self._run(self._start_server(ip))
            self.servers[name] = (ip, runner, engine)
        ip = self.servers[name][0]
        conditions = {c.type: c.status for c in pod.status.conditions or []}
        gates_open = all(conditions.get(g.condition_type) == "True" for g in pod.spec.readiness_gates or [])
        server_ready = _get_status(f"http://{ip}:{CONTAINER_PORT}/ready") == 200
        restarts = self.restarts.get(name, 0)
        wanted = (ip, server_ready and gates_open, restarts)
        if self._published.get(name) != wanted:
            self.core.patch_namespaced_pod_status(
                name,
                self.namespace,
                _status(ip, server_ready, wanted[1], restarts),
                _content_type="application/strategic-merge-patch+json",
            )
            self._published[name] = wanted
            self.readiness.setdefault(name, []).append(wanted[1])
            if wanted[1] and name not in self.ready_with:
                adapters = self.servers[name][2].list_adapters()
                self.ready_with[name] = {a.name for a in adapters if a.state == "ready"}

    async def _start_server(self, ip: str) -> tuple[web.AppRunner, Any]:
        app, engine = self.make_app()
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, ip, CONTAINER_PORT).start()
        return runner, engine

    def _stop_server(self, name: str) -> None:
        if name in self.servers:
            _, runner, engine = self.servers.pop(name)
            self._run(runner.cleanup())
            self._run(engine.shutdown(timeout_s=1.0))


def _get_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _status(ip: str, container_ready: bool, ready: bool, restarts: int) -> dict[str, Any]:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    running = {
        "name": "server",
        "ready": container_ready,
        "restartCount": restarts,
        "image": "local",
        "imageID": "",
    }
    running["state"] = {"running": {"startedAt": f"2026-01-01T00:00:{restarts:02d}Z"}}
    conditions = [
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
        {"type": "ContainersReady", "status": str(container_ready), "lastTransitionTime": now},
        {"type": "Ready", "status": str(ready), "lastTransitionTime": now},
    ]
    return {
        "status": {
            "phase": "Running",
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "hostIP": "127.0.0.1",
            "containerStatuses": [running],
            "conditions": conditions,
        }
    }
