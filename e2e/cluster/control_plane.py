"""A real local Kubernetes control plane: etcd + kube-apiserver (+ kube-controller-manager).

    with LocalCluster.start(with_controllers=True) as cluster:
        cluster.kubectl("get", "namespaces")
        v1 = kubernetes.client.CoreV1Api(cluster.api_client())

Everything runs on free loopback ports from a work directory; `stop()` kills the process
groups and removes the directory (unless it was given by the caller).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

import yaml

from loraplex.localcluster import flags
from loraplex.localcluster.binaries import Binaries, find_binary
from loraplex.localcluster.certs import generate_pki
from loraplex.localcluster.processes import ManagedProcess, free_ports, wait_until

if TYPE_CHECKING:
    import kubernetes.client

STATE_FILE = "state.json"
MIN_SCRATCH_BYTES = 1 << 30


class ClusterStartError(RuntimeError):
    """A component did not come up; the message carries the tail of its log."""


def _scratch_root() -> str | None:
    # etcd fsyncs every write; on tmpfs that is free, which keeps tests fast. etcd preallocates
    # 64 MB WAL segments, so a container's small default /dev/shm (64 MB) won't do.
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        return None
    stats = os.statvfs(shm)
    return str(shm) if stats.f_bavail * stats.f_frsize >= MIN_SCRATCH_BYTES else None


class LocalCluster:
    """A running control plane; use `LocalCluster.start(...)` to make one."""

    def __init__(
        self, workdir: Path, server: str, token: str, processes: dict[str, ManagedProcess], owns_workdir: bool
    ):
        self.workdir = workdir
        self.server = server
        self.token = token
        self.processes = processes
        self.owns_workdir = owns_workdir
        self.layout = flags.Layout(workdir)

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    def start(
        cls,
        with_controllers: bool = False,
        workdir: Path | None = None,
        tie_to_parent: bool = True,
        timeout: float = 90.0,
    ) -> LocalCluster:
        """Start etcd and kube-apiserver (and the controller-manager) and wait until ready.

        `workdir=None` uses a fresh temp dir, removed by `stop()`. `tie_to_parent=False` lets the
        processes outlive this Python process (the `up` command).
        """
        binaries = Binaries.find(with_controllers=with_controllers)
        owns_workdir = workdir is None
        workdir = (
            Path(tempfile.mkdtemp(prefix="loraplex-k8s-", dir=_scratch_root()))
            if workdir is None
            else workdir
        )
        layout = flags.Layout(workdir)
        layout.logs.mkdir(parents=True, exist_ok=True)
        ports = flags.Ports(*free_ports(4))
        token = secrets.token_hex(16)
        cluster = cls(workdir, f"https://127.0.0.1:{ports.apiserver}", token, {}, owns_workdir)
        try:
            cluster._boot(binaries, ports, with_controllers, tie_to_parent, timeout)
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def _boot(
        self, binaries: Binaries, ports: flags.Ports, with_controllers: bool, tie: bool, timeout: float
    ) -> None:
        layout = self.layout
        pki = generate_pki(layout.pki_dir)
        layout.tokens.write_text(flags.token_file_line(self.token))
        layout.tokens.chmod(0o600)

        self._spawn("etcd", flags.etcd_args(binaries, layout, ports), tie)
        etcd_health = f"http://127.0.0.1:{ports.etcd_client}/health"
        self._await("etcd", lambda: b'"true"' in (_http_get(etcd_health) or b""), timeout)

        self._spawn("kube-apiserver", flags.apiserver_args(binaries, layout, pki, ports), tie)
        self._await("kube-apiserver", lambda: self._api_get("/readyz") == b"ok", timeout)
        # /readyz can answer before the bootstrap controller has created the `default` namespace.
        self._await(
            "kube-apiserver", lambda: self._api_get("/api/v1/namespaces/default") is not None, timeout
        )
        layout.kubeconfig.write_text(
            yaml.safe_dump(flags.kubeconfig(self.server, pki.ca_cert.read_bytes(), self.token))
        )
        layout.kubeconfig.chmod(0o600)

        if with_controllers:
            self._spawn(
                "kube-controller-manager", flags.controller_manager_args(binaries, layout, pki, ports), tie
            )
            healthz = f"https://127.0.0.1:{ports.controller_manager}/healthz"
            self._await(
                "kube-controller-manager", lambda: _http_get(healthz, insecure=True) == b"ok", timeout
            )
            # Pods are admitted only once their service account has a token (1.20 admission).
            self._await("kube-controller-manager", self._default_service_account_ready, timeout)
        self._write_state(ports)

    def stop(self) -> None:
        """Stop every component (newest first) and remove the work directory if it is ours."""
        errors = []
        for process in reversed(list(self.processes.values())):
            try:
                process.stop()
            except RuntimeError as exc:
                errors.append(str(exc))
        self.processes.clear()
        if self.owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        else:
            (self.workdir / STATE_FILE).unlink(missing_ok=True)
        if errors:
            raise RuntimeError("; ".join(errors))

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- use -------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.layout.kubeconfig

    @property
    def pids(self) -> dict[str, int]:
        return {name: process.pid for name, process in self.processes.items()}

    def env(self) -> dict[str, str]:
        """This process's environment with KUBECONFIG pointing at the cluster."""
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run the provisioned kubectl against this cluster; raises with its stderr on failure."""
        argv = [str(find_binary("kubectl")), f"--kubeconfig={self.kubeconfig}", *args]
        result = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(
                f"kubectl {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}"
            )
        return result

    def api_client(self) -> kubernetes.client.ApiClient:
        """A `kubernetes` client for this cluster (TLS verified against the local CA)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def is_ready(self) -> bool:
        return all(p.is_alive() for p in self.processes.values()) and self._api_get("/readyz") == b"ok"

    # --- internals -------------------------------------------------------------------------

    def _spawn(self, name: str, argv: list[str], tie_to_parent: bool) -> None:
        log = self.layout.logs / f"{name}.log"
        self.processes[name] = ManagedProcess.spawn(name, argv, log, tie_to_parent)

    def _await(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        process = self.processes[name]
        if (
            not wait_until(lambda: ready() or not process.is_alive(), timeout, interval=0.2)
            or not process.is_alive()
        ):
            state = "exited" if not process.is_alive() else f"not ready after {timeout:.0f}s"
            raise ClusterStartError(f"{name} {state}; log {process.log_path}:\n{process.log_tail()}")

    def _api_get(self, path: str) -> bytes | None:
        return _http_get(self.server + path, token=self.token, ca_file=self.layout.pki_dir / "ca.crt")

    def _default_service_account_ready(self) -> bool:
        body = self._api_get("/api/v1/namespaces/default/serviceaccounts/default")
        return body is not None and bool(json.loads(body).get("secrets"))

    def _write_state(self, ports: flags.Ports) -> None:
        state = {
            "server": self.server,
            "kubeconfig": str(self.kubeconfig),
            "pids": self.pids,
            "ports": vars(ports),
        }
        (self.workdir / STATE_FILE).write_text(json.dumps(state, indent=2))

    @classmethod
    def attach(cls, workdir: Path) -> LocalCluster:
        """The cluster an earlier `start(workdir=..., tie_to_parent=False)` left running there."""
        state = json.loads((workdir / STATE_FILE).read_text())
        layout = flags.Layout(workdir)
        token = layout.tokens.read_text().split(",", 1)[0]
        processes = {
            name: ManagedProcess(name=name, pid=pid, log_path=layout.logs / f"{name}.log")
            for name, pid in state["pids"].items()
        }
        return cls(workdir, state["server"], token, processes, owns_workdir=False)


def _http_get(
    url: str, token: str | None = None, ca_file: Path | None = None, insecure: bool = False
) -> bytes | None:
    """The body of a 200 answer, else None (connection refused, TLS not up yet, 5xx...)."""
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if insecure:  # the controller-manager's self-signed healthz endpoint
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return response.read() if response.status == 200 else None
    except (urllib.error.URLError, OSError, ssl.SSLError):
        return None
