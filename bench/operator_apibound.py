"""What the local API server alone allows at 1000 adapters: no pods, no operator, no proxy.

Three of issue 19's targets at 1000 adapters are paced by the API server: `kubectl get lora`
under 1 s while 1000 adapters are applied, and a dead pod reflected in 1000 statuses within
2 s (1000 status PATCHes). This measures them against the bare control plane, with objects of
the size the operator leaves (a status as it writes one for an adapter Ready on two pods):

- `kubectl get lora` over 1000 such adapters: with nothing else running, while 1000 more are
  created (16 client threads, as `bench/operator.py` applies them), and while the 1000 are
  status-PATCHed (concurrency 32, as the operator's writer, and 4);
- the API server's (and etcd's) CPU per write, read from /proc, in rows without the `kubectl`
  loop: the CPU a write costs, so the least time 1000 take when both cores do nothing else.

    python bench/operator_apibound.py --write     # docs/benchmarks/operator_apibound.json
    python bench/operator.py --report             # operator.md shows it
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from benchutil import git_commit
from kubernetes import client
from operator_probes import _Poller

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.install import apply_crds
from loraplex.operator.asynckube import AsyncKube
from loraplex.operator.k8s import FIELD_MANAGER

GROUP, VERSION, PLURAL = "loraplex.dev", "v1alpha1", "loraadapters"
RESULT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "operator_apibound.json"
N = 1000
MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PODS = ("tiny-llama-5ffb877889-2bqrl", "tiny-llama-5ffb877889-ltnxw")


def operator_status(round_: int) -> dict[str, Any]:
    """The status the operator writes for an adapter Ready on two pods (the fields of
    `bench/operator.py`'s `object_example`); `round_` changes one instance so each write is real."""
    at = "2026-12-02T07:35:01Z"

    def condition(kind: str, reason: str, message: str) -> dict[str, Any]:
        return {"type": kind, "status": "True", "reason": reason, "message": message,
                "observedGeneration": 1, "lastTransitionTime": at}  # fmt: skip

    def instance(pod: str, ready: bool) -> dict[str, Any]:
        return {"pod": pod, "state": "Ready" if ready else "Pending", "attempts": 0, "loadedAt": at}

    return {
        "observedGeneration": 1,
        "phase": "Ready",
        "conditions": [
            condition("Accepted", "Accepted", "attached to bench-f865f8/tiny-llama"),
            condition("Loaded", "Loaded", "2/2 pods"),
            condition("Ready", "AllReplicasLoaded", "2/2 pods"),
        ],
        "servedName": "adapter",
        "resolved": {
            "alpha": 32,
            "rank": 16,
            "sha256": "8f" * 32,
            "sizeBytes": 622592,
            "targetModules": MODULES,
        },
        "desiredReplicas": 2,
        "readyReplicas": 2 - round_ % 2,
        "instances": [instance(PODS[0], round_ % 2 == 0), instance(PODS[1], True)],
        "tokens": {"prompt": 0, "generated": 0},
    }


def adapter(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoraAdapter",
        "metadata": {"name": name, "finalizers": ["loraplex.dev/unload"]},
        "spec": {"baseModel": {"name": "tiny-llama"}, "source": {"uri": "file:///tmp/adapters/sql"}},
    }


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (/proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rfind(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class GetLoop(_Poller):
    """`kubectl get lora` one after another in a thread while a phase runs (none: `get` None)."""

    def __init__(self, get: Callable[[], float] | None) -> None:
        self._get, self.seconds = get, []
        super().__init__()

    def _loop(self) -> None:
        while self._get is not None and not self._stop.is_set():
            self.seconds.append(round(self._get(), 2))


async def patch_all(
    kube: AsyncKube, namespace: str, names: list[str], status: dict[str, Any], conc: int
) -> None:
    limit = asyncio.Semaphore(conc)

    async def one(name: str) -> None:
        async with limit:
            await kube.patch_status(PLURAL, namespace, name, status)

    await asyncio.gather(*(one(name) for name in names))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="each phase this many times, interleaved")
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.name} (operator.md shows it)")
    args = parser.parse_args()
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "cpus": os.cpu_count(),
    }
    with LocalCluster.start() as cluster:
        apply_crds(cluster)
        custom = client.CustomObjectsApi(cluster.api_client())
        pids = {name: int(subprocess.check_output(["pgrep", "-n", "-x", name]).split()[0])
                for name in ("kube-apiserver", "etcd")}  # fmt: skip
        listed = f"bound-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", listed)
        names = [f"a-{i:04d}" for i in range(N)]

        def create(namespace: str, name: str) -> None:
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, adapter(name))

        with ThreadPoolExecutor(16) as pool:
            list(pool.map(functools.partial(create, listed), names))
        kube = AsyncKube(cluster.api_client().configuration, 64, FIELD_MANAGER)
        loop = asyncio.new_event_loop()
        loop.run_until_complete(patch_all(kube, listed, names, operator_status(0), 32))

        def kubectl_get() -> float:
            started = time.monotonic()
            cluster.kubectl("get", "lora", "-n", listed)
            return time.monotonic() - started

        stored = custom.get_namespaced_custom_object(GROUP, VERSION, listed, PLURAL, names[0])
        result["object_bytes"] = len(json.dumps(stored, separators=(",", ":")))
        result["managed_fields_bytes"] = len(
            json.dumps(stored["metadata"]["managedFields"], separators=(",", ":"))
        )
        rows, round_ = [], 0

        def phase(label: str, writes: int, run: Callable[[], None], gets_too: bool = True) -> None:
            """`run` timed, with the API server's CPU over it; `kubectl get` in a loop meanwhile
            unless `gets_too` is False (then the CPU is the writes' alone)."""
            load = os.getloadavg()[0]
            before = {name: cpu_s(pid) for name, pid in pids.items()}
            with GetLoop(kubectl_get if gets_too else None) as gets:
                started = time.monotonic()
                run()
                took = time.monotonic() - started
            used = {name: cpu_s(pid) - before[name] for name, pid in pids.items()}
            row = {
                "phase": label,
                "writes": writes,
                "seconds": round(took, 2),
                "writes_per_s": round(writes / took) if writes else None,
                "apiserver_cpu_ms_per_write": round(1000 * used["kube-apiserver"] / writes, 2)
                if writes
                else None,
                "etcd_cpu_ms_per_write": round(1000 * used["etcd"] / writes, 2) if writes else None,
                "kubectl_get_s": gets.seconds,
                "kubectl_get_max_s": max(gets.seconds) if gets.seconds else None,
                "load_1m": round(load, 1),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

        def creates(pool: ThreadPoolExecutor) -> Callable[[], None]:
            namespace = f"bound-{uuid.uuid4().hex[:6]}"
            cluster.kubectl("create", "namespace", namespace)

            def run() -> None:
                list(pool.map(functools.partial(create, namespace), names))

            return run

        def patches(status: dict[str, Any], conc: int) -> Callable[[], None]:
            return lambda: loop.run_until_complete(patch_all(kube, listed, names, status, conc))

        with ThreadPoolExecutor(16) as pool:
            for _ in range(args.rounds):
                phase("nothing else", 0, lambda: time.sleep(2.5))
                phase("1000 creates, 16 threads", N, creates(pool))
                for conc, gets_too in ((32, True), (4, True), (32, False)):
                    round_ += 1
                    label = f"1000 status PATCHes, {conc} in flight" + ("" if gets_too else ", no kubectl")
                    phase(label, N, patches(operator_status(round_), conc), gets_too)
                phase("1000 creates, 16 threads, no kubectl", N, creates(pool), gets_too=False)
        loop.run_until_complete(kube.close())
        loop.close()
    result["rows"] = rows
    result["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.write:
        RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
