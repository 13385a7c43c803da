"""The API server's own pace for the operator's writes, on the local control plane, nothing
else running: N LoraAdapters present, N status merge-PATCHes at a few concurrencies through
(a) the operator's threaded `kubernetes` client (`Kube.patch_status`) and (b) the operator's
async writer (`AsyncKube`, aiohttp), with the whole status and with only a changed count,
interleaved; the object's size; a `kubectl get lora`.

    python bench/operator_apipace.py --n 1000 --concurrency 32,64 --write   # + operator.py --report
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from apiproxy import ProxyProcess
from benchutil import git_commit
from kubernetes import client, config

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.install import apply_crds
from loraplex.operator.asynckube import AsyncKube
from loraplex.operator.k8s import FIELD_MANAGER, Kube

GROUP, VERSION, PLURAL = "loraplex.dev", "v1alpha1", "loraadapters"
RESULT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "operator_apipace.json"


class ThreadedPatches:
    """The status PATCH as the operator sent it before `AsyncKube`: the `kubernetes` client's
    call, in the operator's worker threads."""

    def __init__(self, api: client.ApiClient) -> None:
        self._kube, self._custom = Kube(api), client.CustomObjectsApi(api)

    async def patch_status(self, plural: str, namespace: str, name: str, status: dict[str, Any]) -> None:
        await self._kube._run(
            lambda: self._custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, plural, name, {"status": status}, field_manager=FIELD_MANAGER
            )
        )


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def status(round_: int) -> dict[str, Any]:
    """A status as a dead pod's pass writes it; each round differs from the last (a real write)."""
    return {
        "phase": "Ready",
        "readyReplicas": 1 + round_ % 2,
        "instances": [
            {"pod": "tiny-llama-0", "state": "Ready" if round_ % 2 else "Pending", "attempts": round_},
            {"pod": "tiny-llama-1", "state": "Ready", "loadedAt": "2026-12-02T04:00:00Z"},
        ],
    }


async def patch_all(kube: Any, namespace: str, names: list[str], body: dict[str, Any], conc: int) -> float:
    limit = asyncio.Semaphore(conc)

    async def one(name: str) -> None:
        async with limit:
            await kube.patch_status(PLURAL, namespace, name, body)

    started = time.monotonic()
    await asyncio.gather(*(one(name) for name in names))
    return time.monotonic() - started


async def measure(api: client.ApiClient, namespace: str, names: list[str], concurrencies: list[int]) -> list:
    threaded = ThreadedPatches(api)
    asynchronous = AsyncKube(api.configuration, max(concurrencies), FIELD_MANAGER)
    rows, round_ = [], 0
    try:
        for conc in concurrencies:
            clients = (("threads", threaded), ("aiohttp", asynchronous), ("aiohttp-small", asynchronous))
            for label, kube in (*clients, ("threads", threaded)):
                round_ += 1
                load = os.getloadavg()[0]
                cpu = cpu_s()
                body = status(round_)
                if label.endswith("small"):  # only what changed: the count, not the whole status
                    body = {"readyReplicas": body["readyReplicas"]}
                took = await patch_all(kube, namespace, names, body, conc)
                rows.append(
                    {
                        "client": label,
                        "concurrency": conc,
                        "n": len(names),
                        "seconds": round(took, 2),
                        "per_s": round(len(names) / took),
                        "client_cpu_ms_per_patch": round(1000 * (cpu_s() - cpu) / len(names), 2),
                        "load_1m": round(load, 1),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    finally:
        await asynchronous.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--concurrency", default="32,64")
    parser.add_argument(
        "--through-proxy", action="store_true", help="through bench/apiproxy.py's counting proxy"
    )
    parser.add_argument("--write", action="store_true", help=f"write {RESULT.name} (operator.md shows it)")
    args = parser.parse_args()
    started_at = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "commit": git_commit(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }
    with LocalCluster.start() as cluster:
        apply_crds(cluster)
        namespace = f"pace-{uuid.uuid4().hex[:6]}"
        cluster.kubectl("create", "namespace", namespace)
        custom = client.CustomObjectsApi(cluster.api_client())
        names = [f"a-{i:04d}" for i in range(args.n)]

        def create(name: str) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LoraAdapter",
                "metadata": {"name": name, "finalizers": ["loraplex.dev/unload"]},
                "spec": {"baseModel": {"name": "tiny-llama"}, "source": {"uri": "file:///tmp/x"}},
            }
            custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        started = time.monotonic()
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(create, names))
        creates_s = round(time.monotonic() - started, 2)
        print(json.dumps({"creates_s": creates_s}), flush=True)
        concurrencies = [int(c) for c in args.concurrency.split(",")]
        api = cluster.api_client()
        proxy = None
        if args.through_proxy:  # as the operator benchmark's operator talks to the API server
            proxy = ProxyProcess(cluster.kubeconfig)
            proxy.start()
            path = proxy.kubeconfig(Path(tempfile.mkdtemp(prefix="apipace-")) / "kubeconfig")
            api = config.new_client_from_config(config_file=str(path))
        try:
            rows = asyncio.run(measure(api, namespace, names, concurrencies))
        finally:
            if proxy is not None:
                proxy.stop()
        one = cluster.kubectl(
            "get", "--raw", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{names[0]}"
        ).stdout
        gets = []
        for _ in range(3):
            started = time.monotonic()
            cluster.kubectl("get", "lora", "-n", namespace, "--no-headers")
            gets.append(time.monotonic() - started)
        listing = cluster.kubectl("get", "--raw", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}")
        stored = json.loads(one)
        result = {
            **started_at,
            "through_proxy": args.through_proxy,
            "creates_s": creates_s,
            "rows": rows,
            "object_bytes": len(json.dumps(stored, separators=(",", ":"))),
            "managed_fields_bytes": len(
                json.dumps(stored["metadata"].get("managedFields"), separators=(",", ":"))
            ),
            "managers": [m["manager"] for m in stored["metadata"].get("managedFields", [])],
            "list_bytes": len(listing.stdout),
            "kubectl_get_lora_s": [round(t, 2) for t in gets],
            "load_average_end": [round(x, 2) for x in os.getloadavg()],
        }
        print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
        if args.write:
            RESULT.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
