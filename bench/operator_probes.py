"""What `bench/operator.py` watches besides status: `kubectl get lora` timed in a loop, the pods'
own adapter lists compared with status, the API server's latency by verb, an optional py-spy
profile of the operator.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

Counter = collections.Counter


class _Poller:
    """A daemon thread running `_loop` from `__enter__` until `__exit__` sets `_stop`."""

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        raise NotImplementedError


class KubectlTimer(_Poller):
    """`kubectl get lora -n NS` every 2 s in a thread (the target: under 1 s throughout)."""

    def __init__(self, kubectl: Callable[..., Any], namespace: str) -> None:
        self._kubectl, self._namespace = kubectl, namespace
        self.times: list[float] = []
        super().__init__()

    def _loop(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            self._kubectl("get", "lora", "-n", self._namespace, "--no-headers")
            self.times.append(time.monotonic() - started)
            self._stop.wait(2.0)

    def summary(self) -> dict[str, Any]:
        ordered = sorted(self.times) or [0.0]
        return {
            "kubectl_gets": len(self.times),
            "kubectl_get_p50_s": round(ordered[len(ordered) // 2], 3),
            "kubectl_get_max_s": round(ordered[-1], 3),
        }


def pod_urls(core: Any, namespace: str, selector: str) -> dict[str, str]:
    """name -> http://ip:port of every running server pod."""
    urls = {}
    for pod in core.list_namespaced_pod(namespace, label_selector=selector).items:
        ports = [
            p for c in pod.spec.containers if c.name == "server" for p in c.ports or () if p.name == "http"
        ]
        if pod.status.pod_ip and ports and not pod.metadata.deletion_timestamp:
            urls[pod.metadata.name] = f"http://{pod.status.pod_ip}:{ports[0].container_port}"
    return urls


def _adapters(url: str, timeout: float) -> list[dict[str, Any]] | None:
    """A pod's `GET /v1/adapters` entries, None when it does not answer."""
    try:
        with urllib.request.urlopen(f"{url}/v1/adapters", timeout=timeout) as response:
            return json.load(response)["data"]
    except (OSError, ValueError, KeyError):
        return None


def held(url: str) -> set[str] | None:
    """The adapters a pod reports Ready, None when it does not answer."""
    data = _adapters(url, timeout=5)
    return None if data is None else {item["name"] for item in data if item.get("state") == "ready"}


def loaded_at(url: str) -> list[float]:
    return [item["loaded_at"] for item in _adapters(url, timeout=10) or () if item.get("loaded_at")]


class ContradictionWatch(_Poller):
    """Polls the pods and status in a thread: pods (a), then a LIST of statuses (b), then pods
    again (c). A contradiction is an adapter whose status (b) says Ready on a pod that answered
    both (a) and (c) without holding it: no race of the sampling can produce one."""

    def __init__(self, bench: Any, urls: Callable[[], dict[str, str]], names: list[str]) -> None:
        self._bench, self._urls, self._names = bench, urls, set(names)
        self.rounds = 0
        self.contradictions: Counter[str] = Counter()  # "adapter@pod" -> rounds seen
        super().__init__()

    def _loop(self) -> None:
        while not self._stop.is_set():
            urls = self._urls()
            before = {pod: held(url) for pod, url in urls.items()}
            statuses = self._bench.statuses()
            after = {pod: held(url) for pod, url in urls.items()}
            self.rounds += 1
            for name, status in statuses.items():
                if name not in self._names:
                    continue
                served = status.get("servedName") or name
                for item in status.get("instances") or ():
                    pod = item.get("pod")
                    first, last = before.get(pod), after.get(pod)
                    if item.get("state") != "Ready" or first is None or last is None:
                        continue
                    if served not in first and served not in last:
                        self.contradictions[f"{name}@{pod}"] += 1
            self._stop.wait(0.5)

    def summary(self) -> dict[str, Any]:
        return {
            "pod_polls": self.rounds,
            "status_ready_not_held": sum(self.contradictions.values()),
            "examples": sorted(self.contradictions)[:5],
        }


def apiserver_latency(text: str) -> Counter[tuple[str, str, str]]:
    """(verb, resource, "sum"|"count") from `apiserver_request_duration_seconds`, and the API
    server's own calls to etcd as ("etcd <operation>", type, ...) from `etcd_request_duration_seconds`."""
    out: Counter[tuple[str, str, str]] = Counter()
    for line in text.splitlines():
        match = re.match(r"(apiserver|etcd)_request_duration_seconds_(sum|count)\{(.*)\} (\S+)", line)
        if not match:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3)))
        if match.group(1) == "etcd":
            key = (f"etcd {labels.get('operation', '')}", labels.get("type", ""))
        else:
            resource = labels.get("resource", "") + (
                f"/{labels['subresource']}" if labels.get("subresource") else ""
            )
            key = (labels.get("verb", ""), resource)
        out[(*key, match.group(2))] += float(match.group(4))
    return out


def latency_delta(after: Counter, before: Counter, floor: int = 5) -> dict[str, str]:
    """Mean latency (ms) and count per verb and resource over the window (at least `floor` calls)."""
    rows = {}
    for verb, resource, kind in sorted(after):
        if kind != "count":
            continue
        count = after[(verb, resource, "count")] - before[(verb, resource, "count")]
        total = after[(verb, resource, "sum")] - before[(verb, resource, "sum")]
        if count >= floor and verb != "WATCH":
            rows[f"{verb} {resource}"] = f"{int(count)} x {1000 * total / count:.0f} ms"
    return rows


class Profiler:
    """py-spy attached to the operator while a step runs (collapsed stacks, `--format raw`).
    py-spy is not a dependency of the project: `--profile` asks for it (pip install py-spy)."""

    def __init__(self, out: Path | None) -> None:
        self.out = out
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, pid: int, name: str) -> None:
        if self.out is None:
            return
        spy = shutil.which("py-spy") or str(Path(__file__).resolve().parents[1] / ".venv/bin/py-spy")
        if not Path(spy).exists():
            raise SystemExit("--profile needs py-spy (pip install py-spy): not found")
        self.out.mkdir(parents=True, exist_ok=True)
        target = self.out / f"{name}.txt"
        argv = [spy, "record", "--pid", str(pid), "--format", "raw", "-r", "50", "-o", str(target)]
        self._process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop(self) -> None:
        if self._process is not None:
            self._process.send_signal(signal.SIGINT)  # py-spy writes the file on SIGINT
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._process = None


class StatusWatch:
    """Every LoraAdapter's status in the namespace, kept by one watch (a LIST, then events):
    the benchmark's polling costs the API server nothing per poll, so it measures the operator
    and not its own LISTs of 1000 objects."""

    def __init__(self, custom: Any, namespace: str, group: str, version: str) -> None:
        self._custom, self._args = custom, (group, version, namespace, "loraadapters")
        self._lock = threading.Lock()
        self._statuses: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> StatusWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def statuses(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self._statuses)

    def _loop(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version = None
        while not self._stop.is_set():
            if version is None:  # first, or the watch expired (410): list again
                listed = self._custom.list_namespaced_custom_object(*self._args)
                with self._lock:
                    self._statuses = {i["metadata"]["name"]: i.get("status") or {} for i in listed["items"]}
                version = listed["metadata"]["resourceVersion"]
            try:
                stream = watch.Watch().stream(
                    self._custom.list_namespaced_custom_object,
                    *self._args,
                    resource_version=version,
                    timeout_seconds=60,
                )
                for event in stream:
                    obj = event["object"]
                    if event["type"] == "ERROR":  # e.g. expired: list again
                        version = None
                        break
                    name, version = obj["metadata"]["name"], obj["metadata"]["resourceVersion"]
                    with self._lock:
                        if event["type"] == "DELETED":
                            self._statuses.pop(name, None)
                        else:
                            self._statuses[name] = obj.get("status") or {}
                    if self._stop.is_set():
                        return
            except ApiException as error:
                version = None if error.status == 410 else version
                time.sleep(0.2)
            except (OSError, ValueError):
                time.sleep(0.2)
