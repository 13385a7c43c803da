"""The local pod runner: a small stand-in for scheduler + kubelet on the local cluster (DESIGN.md §7).

It binds Pending pods (those matching a label selector, in the given namespaces or all) to a
node it registers, runs each pod's container `command`+`args` as a local process on a loopback
address of its own (127.x.y.z, handed to the process as HOSTNAME, the bind address our server
reads; PORT stays the container's), with the container's env (literals, Secret/ConfigMap keys,
fieldRefs) and its ConfigMap/Secret/emptyDir volumes as local directories (env values under a
mount path rewritten onto them; ConfigMaps kept in sync like kubelet does). It publishes pod
status as kubelet would, runs the httpGet probes, restarts crashed processes and kills them when
the pod is deleted or the runner stops.

    with PodRunner(api_client, state_dir, namespaces=("demo",)) as runner: ...
    python -m loraplex.localcluster pods --namespace demo      # foreground, until SIGTERM
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.rest import ApiException

from loraplex.localcluster import pod_spec
from loraplex.localcluster.pod_worker import LaunchPlan, PodWorker, Probe, now_rfc3339

log = logging.getLogger(__name__)
NODE_NAME = "local-node"
POLL_S = 0.3
VOLUME_SYNC_S = 2.0
PROBE_KINDS = {"startup": "startupProbe", "readiness": "readinessProbe", "liveness": "livenessProbe"}
Key = tuple[str, str]  # (namespace, pod name)


class PodRunner:
    """Runs the pods bound to `node_name` as local processes. Use as a context manager."""

    def __init__(
        self,
        api: client.ApiClient,
        state_dir: Path,
        namespaces: tuple[str, ...] = (),
        selector: str | None = None,
        node_name: str = NODE_NAME,
        extra_env: Mapping[str, str] | None = None,
        probe_period_cap_s: float = 1.0,
        tie_to_parent: bool = True,
        nice: int = 0,
    ) -> None:
        """`probe_period_cap_s` shortens probe periods (the semantics stay kubelet's) so local
        pods turn Ready in about a second rather than a probe period. `nice` lowers the pods'
        CPU priority below the control plane's (on a real cluster they run on other nodes)."""
        self.api, self.core = api, client.CoreV1Api(api)
        self.state_dir, self.namespaces, self.selector = state_dir, namespaces, selector
        self.node_name, self.extra_env = node_name, dict(extra_env or {})
        self.probe_period_cap_s, self.tie_to_parent, self.nice = probe_period_cap_s, tie_to_parent, nice
        self.workers: dict[Key, PodWorker] = {}
        # A loopback /16 of its own (all of 127/8 is local on Linux): runners in parallel
        # test sessions don't hand out the same pod IPs.
        self._subnet = f"127.{random.randint(64, 250)}"
        self._next_ip = 2
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pod-runner", daemon=True)
        self._last_volume_sync = 0.0

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> PodRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.register_node()
        self._thread.start()

    def stop(self) -> None:
        """Stop polling, then stop every pod's process (SIGTERM, SIGKILL after the grace period)."""
        self._stop.set()
        self._thread.join(timeout=10)
        for worker in self.workers.values():
            worker.stop()
        for worker in self.workers.values():
            worker.join(timeout=90)
        self.workers.clear()

    def wait(self) -> None:
        """Block until `stop()` is called (the CLI's foreground mode)."""
        while not self._stop.wait(1):
            pass

    # --- what tests use ----------------------------------------------------------------------

    def worker(self, namespace: str, name: str) -> PodWorker:
        return self.workers[(namespace, name)]

    def kill(self, namespace: str, name: str) -> None:
        """Crash a pod's container (SIGKILL): the runner restarts it like kubelet would."""
        self.worker(namespace, name).kill_process()

    # --- the node ----------------------------------------------------------------------------

    def register_node(self) -> None:
        body = {
            "metadata": {
                "name": self.node_name,
                "labels": {"kubernetes.io/hostname": self.node_name, "loraplex.dev/local-pod-runner": "true"},
            }
        }
        with contextlib.suppress(ApiException):
            self.core.create_node(body)
        now = now_rfc3339()
        status = {
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "LocalPodRunner",
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": now,
                }
            ],
            "addresses": [{"type": "InternalIP", "address": "127.0.0.1"}],
            "capacity": {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"},
            "allocatable": {"cpu": "64", "memory": "512Gi", "pods": "110", "ephemeral-storage": "1Ti"},
        }
        self.core.patch_node_status(self.node_name, {"status": status})

    # --- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception as error:  # one failed round (API hiccup) must not stop the runner
                log.warning("pod runner round failed: %r", error)
            self._stop.wait(POLL_S)

    def _round(self) -> None:
        seen: set[Key] = set()
        for pod in self._list_pods():
            key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
            node = pod["spec"].get("nodeName")
            if not node and not pod["metadata"].get("deletionTimestamp"):
                self._bind(*key)
            elif node == self.node_name:
                seen.add(key)
                self._sync(key, pod)
        for key in [k for k in self.workers if k not in seen]:  # force-deleted: nothing to report
            self.workers.pop(key).stop()
        self._reap()
        if time.monotonic() - self._last_volume_sync > VOLUME_SYNC_S:
            self._last_volume_sync = time.monotonic()
            for worker in self.workers.values():
                self._refresh(worker)

    def _list_pods(self) -> list[dict[str, Any]]:
        if self.namespaces:
            pods = [
                pod
                for ns in self.namespaces
                for pod in self.core.list_namespaced_pod(ns, label_selector=self.selector).items
            ]
        else:
            pods = self.core.list_pod_for_all_namespaces(label_selector=self.selector).items
        return [self.api.sanitize_for_serialization(pod) for pod in pods]

    def _bind(self, namespace: str, name: str) -> None:
        body = {"apiVersion": "v1", "kind": "Binding", "metadata": {"name": name}}
        body["target"] = {"apiVersion": "v1", "kind": "Node", "name": self.node_name}
        # _preload_content=False: the client can't deserialize the Binding reply (kubernetes#547).
        self.core.create_namespaced_pod_binding(name, namespace, body, _preload_content=False)
        log.info("bound pod %s/%s to %s", namespace, name, self.node_name)

    def _sync(self, key: Key, pod: dict[str, Any]) -> None:
        worker = self.workers.get(key)
        if worker is None:
            if pod["metadata"].get("deletionTimestamp"):
                self._delete_now(*key)  # never ran here (e.g. the runner restarted): nothing to stop
            else:
                self._start_worker(key, pod)
            return
        worker.pod = pod
        if pod["metadata"].get("deletionTimestamp"):
            worker.stop()

    def _allocate_ip(self, ports: list[int]) -> str:
        """The next loopback address whose container ports are free (another runner's pods
        or a stray server may hold some)."""
        while True:
            ip = f"{self._subnet}.{self._next_ip // 250}.{self._next_ip % 250 + 2}"
            self._next_ip += 1
            if all(_port_free(ip, port) for port in ports):
                return ip

    def _start_worker(self, key: Key, pod: dict[str, Any]) -> None:
        pod_dir = self.state_dir / "pods" / f"{key[0]}_{key[1]}"
        pod_dir.mkdir(parents=True, exist_ok=True)
        container = pod_spec.server_container(pod)
        ports = {p["name"]: p["containerPort"] for p in container.get("ports") or [] if p.get("name")}
        ip = self._allocate_ip([p["containerPort"] for p in container.get("ports") or []])
        probes = {
            kind: probe
            for kind, field in PROBE_KINDS.items()
            if (probe := Probe.from_spec(container.get(field), ports, self.probe_period_cap_s))
        }
        worker = PodWorker(
            pod,
            ip,
            self._plan(pod, ip, pod_dir),
            probes,
            self._publisher(*key),
            self.tie_to_parent,
            self.nice,
        )
        self.workers[key] = worker
        worker.start()
        log.info("running pod %s/%s on %s", *key, ip)

    def _plan(self, pod: dict[str, Any], ip: str, pod_dir: Path) -> LaunchPlan | str:
        """How to start the container, or why it can't start (kubelet retries; so do we)."""
        try:
            container = pod_spec.server_container(pod)
            dirs = pod_spec.volume_dirs(pod, pod_dir)
            self._write_volumes(pod, dirs)
            mounts = pod_spec.container_mounts(container, dirs)
            lookup = self._lookup(pod["metadata"]["namespace"])
            env = pod_spec.container_env(pod, container, lookup, mounts)
            path = os.pathsep.join((str(Path(sys.executable).parent), os.environ.get("PATH", "")))
            base = {"PATH": path, "LANG": os.environ.get("LANG", "C.UTF-8")}
            env = {**base, **self.extra_env, **env, "HOSTNAME": ip}
            argv = pod_spec.resolve_argv(container, env, path)
        except (pod_spec.PodSpecError, ApiException, OSError) as error:
            return str(error)
        return LaunchPlan(argv=argv, env=env, cwd=pod_dir, log_path=pod_dir / "container.log")

    def _write_volumes(self, pod: dict[str, Any], dirs: Mapping[str, Path]) -> bool:
        lookup = self._lookup(pod["metadata"]["namespace"])
        changed = False
        for volume in pod["spec"].get("volumes") or []:
            files = pod_spec.volume_files(volume, lookup)
            if files is None:
                dirs[volume["name"]].mkdir(parents=True, exist_ok=True)
            else:
                changed |= pod_spec.write_volume(dirs[volume["name"]], files)
        return changed

    def _refresh(self, worker: PodWorker) -> None:
        """Keep ConfigMap/Secret volumes current; retry a pod whose config was missing."""
        pod_dir = self.state_dir / "pods" / f"{worker.pod['metadata']['namespace']}_{worker.pod_name}"
        try:
            if isinstance(worker.plan, str):
                worker.plan = self._plan(worker.pod, worker.ip, pod_dir)
            else:
                self._write_volumes(worker.pod, pod_spec.volume_dirs(worker.pod, pod_dir))
        except (pod_spec.PodSpecError, ApiException, OSError) as error:
            log.warning("pod %s: volume sync failed: %s", worker.pod_name, error)

    def _lookup(self, namespace: str) -> pod_spec.Lookup:
        def lookup(kind: str, name: str, key: str | None) -> Any:
            try:
                if kind == "secret":
                    raw = self.core.read_namespaced_secret(name, namespace).data or {}
                    data = {k: base64.b64decode(v).decode(errors="replace") for k, v in raw.items()}
                else:
                    data = self.core.read_namespaced_config_map(name, namespace).data or {}
            except ApiException as error:
                if error.status == 404:
                    return None
                raise
            return data if key is None else data.get(key)

        return lookup

    def _publisher(self, namespace: str, name: str) -> Any:
        def publish(status: dict[str, Any]) -> None:
            try:
                self.core.patch_namespaced_pod_status(
                    name,
                    namespace,
                    {"status": status},
                    _content_type="application/strategic-merge-patch+json",
                )
            except ApiException as error:
                if error.status != 404:
                    log.warning("pod %s/%s: status update failed: %s", namespace, name, error.reason)

        return publish

    def _reap(self) -> None:
        """Pods being deleted whose process has stopped: finish the deletion (kubelet's part)."""
        for key, worker in list(self.workers.items()):
            if worker.stopping.is_set() and worker.finished.is_set():
                self.workers.pop(key)
                self._delete_now(*key)

    def _delete_now(self, namespace: str, name: str) -> None:
        with contextlib.suppress(ApiException):
            self.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)


def _port_free(ip: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loraplex.localcluster pods", description=__doc__)
    parser.add_argument("-n", "--namespace", action="append", default=[], help="repeatable; default all")
    parser.add_argument("-l", "--selector", default=None, help="label selector of the pods to run")
    parser.add_argument("--kubeconfig", default=os.environ.get("KUBECONFIG"), help="[$KUBECONFIG]")
    parser.add_argument("--state-dir", type=Path, required=True, help="pod dirs and container logs")
    parser.add_argument("--node-name", default=NODE_NAME)
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE added to every container")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api = config.new_client_from_config(config_file=args.kubeconfig)
    extra_env = dict(item.split("=", 1) for item in args.env)
    runner = PodRunner(api, args.state_dir, tuple(args.namespace), args.selector, args.node_name, extra_env)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: runner._stop.set())
    with runner:
        runner.wait()
    return 0
