"""One pod's life on the local pod runner: its container as a process, probes, restarts, and the
status a kubelet would publish. One thread per pod; the runner hands it the latest pod object."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from loraplex.localcluster.processes import _die_with_parent, group_alive, stop_group

log = logging.getLogger(__name__)
TICK_S = 0.2
MAX_BACKOFF_S = 20.0
QUICK_EXIT_S = 10.0  # a process that dies sooner than this counts towards CrashLoopBackOff


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Probe:
    """One httpGet probe from the container spec, with its own schedule and counters."""

    path: str
    port: int
    period_s: float
    timeout_s: float
    failure_threshold: int
    success_threshold: int
    initial_delay_s: float
    successes: int = 0
    failures: int = 0
    passed: bool = False
    next_at: float = 0.0

    @classmethod
    def from_spec(
        cls, spec: Mapping[str, Any] | None, ports: Mapping[str, int], period_cap_s: float
    ) -> Probe | None:
        if not spec or "httpGet" not in spec:
            return None  # exec and tcpSocket probes: not used by our pods
        port = spec["httpGet"]["port"]
        return cls(
            path=spec["httpGet"].get("path", "/"),
            port=int(ports.get(port, port)),
            period_s=min(float(spec.get("periodSeconds", 10)), period_cap_s),
            timeout_s=float(spec.get("timeoutSeconds", 1)),
            failure_threshold=int(spec.get("failureThreshold", 3)),
            success_threshold=int(spec.get("successThreshold", 1)),
            initial_delay_s=min(float(spec.get("initialDelaySeconds", 0)), period_cap_s),
        )

    def reset(self, started: float) -> None:
        self.successes = self.failures = 0
        self.passed = False
        self.next_at = started + self.initial_delay_s

    def due(self, now: float) -> bool:
        return now >= self.next_at

    def record(self, ok: bool, now: float) -> None:
        self.next_at = now + self.period_s
        self.successes, self.failures = (self.successes + 1, 0) if ok else (0, self.failures + 1)
        if self.successes >= self.success_threshold:
            self.passed = True
        elif self.failures >= self.failure_threshold:
            self.passed = False

    @property
    def failed(self) -> bool:
        return self.failures >= self.failure_threshold


def http_ok(ip: str, probe: Probe) -> bool:
    try:
        with urllib.request.urlopen(
            f"http://{ip}:{probe.port}{probe.path}", timeout=probe.timeout_s
        ) as reply:
            return 200 <= reply.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class ContainerState:
    """What kubelet tracks of the container: the process and its history."""

    restart_count: int = 0
    started_at: str | None = None
    started_mono: float = 0.0
    last_exit: dict[str, Any] | None = None
    waiting: tuple[str, str] | None = ("ContainerCreating", "")
    backoff_until: float = 0.0
    quick_exits: int = 0
    probes: dict[str, Probe] = field(default_factory=dict)


@dataclass(frozen=True)
class LaunchPlan:
    """Everything needed to start the container's process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    log_path: Path


class PodWorker(threading.Thread):
    """Runs one pod until it is deleted or the runner stops (then kills its process)."""

    def __init__(
        self,
        pod: dict[str, Any],
        ip: str,
        plan: LaunchPlan | str,
        probes: dict[str, Probe],
        publish: Callable[[dict[str, Any]], None],
        tie_to_parent: bool = True,
        nice: int = 0,
    ) -> None:
        super().__init__(name=f"pod-{pod['metadata']['name']}", daemon=True)
        self.nice = nice
        self.pod, self.ip, self.plan = pod, ip, plan
        self.pod_name = pod["metadata"]["name"]
        self.publish, self.tie_to_parent = publish, tie_to_parent
        self.state = ContainerState(probes=probes)
        self.process: subprocess.Popen[bytes] | None = None
        self.stopping = threading.Event()
        self.finished = threading.Event()
        self._published: dict[str, Any] | None = None
        self._transitions: dict[str, tuple[str, str]] = {}

    def _preexec(self) -> None:
        """In the child: its CPU priority, then tie it to this process's life."""
        if self.nice:
            os.nice(self.nice)
        if self.tie_to_parent:
            _die_with_parent()

    def kill_process(self) -> None:
        """SIGKILL the container's process (a crash, as tests and chaos drills cause it)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)

    def stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self._step(time.monotonic())
                time.sleep(TICK_S)
        except Exception:
            log.exception("pod worker %s failed", self.pod_name)
        finally:
            self._terminate()
            self.finished.set()

    def _step(self, now: float) -> None:
        if isinstance(self.plan, str):  # the spec can't run: report it like kubelet, never start
            self.state.waiting = ("CreateContainerConfigError", self.plan)
        elif self.process is None or self.process.poll() is not None:
            self._restart_if_due(now)
        elif self.state.waiting is None:
            self._run_probes(now)
        self._publish_if_changed()

    def _restart_if_due(self, now: float) -> None:
        state = self.state
        if self.process is not None:  # it exited: record, then back off before the next start
            code = self.process.returncode
            state.last_exit = {
                "exitCode": code if code >= 0 else 128 - code,
                "reason": "Error" if code else "Completed",
                "startedAt": state.started_at,
                "finishedAt": now_rfc3339(),
            }
            state.quick_exits = state.quick_exits + 1 if now - state.started_mono < QUICK_EXIT_S else 0
            state.backoff_until = now + min(MAX_BACKOFF_S, 0.5 * 2**state.quick_exits) * (
                state.quick_exits > 1
            )
            state.restart_count += 1
            self.process = None
            log.info("pod %s: container exited with %s, restarting", self.pod_name, code)
            if state.quick_exits > 1:
                state.waiting = ("CrashLoopBackOff", f"back-off restarting failed container (exit {code})")
        if now >= state.backoff_until:
            self._start(now)

    def _start(self, now: float) -> None:
        assert isinstance(self.plan, LaunchPlan)
        with self.plan.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                self.plan.argv,
                env=self.plan.env,
                cwd=self.plan.cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own group: a stop kills what it forked too
                preexec_fn=self._preexec if self.tie_to_parent or self.nice else None,
            )
        self.state.started_at, self.state.started_mono, self.state.waiting = now_rfc3339(), now, None
        for probe in self.state.probes.values():
            probe.reset(now)

    def _run_probes(self, now: float) -> None:
        probes = self.state.probes
        startup = probes.get("startup")
        if startup is not None and not startup.passed:
            if startup.due(now):
                startup.record(http_ok(self.ip, startup), now)
                if startup.failed:
                    self.kill_process()
            return
        for kind in ("readiness", "liveness"):
            probe = probes.get(kind)
            if probe is not None and probe.due(now):
                probe.record(http_ok(self.ip, probe), now)
        liveness = probes.get("liveness")
        if liveness is not None and liveness.failed:
            log.info("pod %s: liveness probe failed, restarting the container", self.pod_name)
            self._stop_process(grace_s=self._grace_s())

    def _container_ready(self) -> bool:
        if self.process is None or self.state.waiting is not None:
            return False
        readiness, startup = self.state.probes.get("readiness"), self.state.probes.get("startup")
        return (startup is None or startup.passed) and (readiness is None or readiness.passed)

    def _publish_if_changed(self) -> None:
        container_ready = self._container_ready()
        conditions = {
            c["type"]: c.get("status") for c in (self.pod.get("status") or {}).get("conditions") or []
        }
        gates = [g["conditionType"] for g in self.pod["spec"].get("readinessGates") or []]
        ready = container_ready and all(conditions.get(gate) == "True" for gate in gates)
        wanted = {
            "ready": ready,
            "container_ready": container_ready,
            "restarts": self.state.restart_count,
            "started": self.state.started_at,
            "waiting": self.state.waiting,
        }
        if wanted == self._published and conditions.get("Ready") == str(ready):
            return
        self.publish(self._status(container_ready, ready))
        self._published = wanted

    def _status(self, container_ready: bool, ready: bool) -> dict[str, Any]:
        state = self.state
        if state.waiting is None:
            current = {"running": {"startedAt": state.started_at}, "waiting": None, "terminated": None}
        else:
            reason, message = state.waiting
            current = {"waiting": {"reason": reason, "message": message}, "running": None, "terminated": None}
        container = {
            "name": self.pod["spec"]["containers"][0]["name"],
            "image": self.pod["spec"]["containers"][0].get("image", ""),
            "imageID": "",
            "containerID": f"local://{self.process.pid}" if self.process else None,
            "ready": container_ready,
            "started": state.waiting is None,
            "restartCount": state.restart_count,
            "state": current,
            "lastState": {"terminated": state.last_exit} if state.last_exit else {},
        }
        statuses = {
            "PodScheduled": True,
            "Initialized": True,
            "ContainersReady": container_ready,
            "Ready": ready,
        }
        return {
            "phase": "Running" if state.started_at else "Pending",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "hostIP": "127.0.0.1",
            "startTime": self.pod["metadata"].get("creationTimestamp"),
            "containerStatuses": [container],
            "conditions": [self._condition(kind, value) for kind, value in statuses.items()],
        }

    def _condition(self, kind: str, value: bool) -> dict[str, Any]:
        status = "True" if value else "False"
        if self._transitions.get(kind, ("", ""))[0] != status:
            self._transitions[kind] = (status, now_rfc3339())
        return {"type": kind, "status": status, "lastTransitionTime": self._transitions[kind][1]}

    def _grace_s(self) -> float:
        meta, spec = self.pod["metadata"], self.pod["spec"]
        grace = meta.get("deletionGracePeriodSeconds")
        return float(grace if grace is not None else spec.get("terminationGracePeriodSeconds", 30))

    def _stop_process(self, grace_s: float) -> None:
        """SIGTERM the process group, SIGKILL after `grace_s`; the next step restarts it."""
        if self.process is None:
            return
        with contextlib.suppress(RuntimeError):
            stop_group(self.process.pid, timeout=grace_s)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self._stop_process(self._grace_s())
        if self.process is not None and group_alive(self.process.pid):
            stop_group(self.process.pid, timeout=1)
        self.process = None
