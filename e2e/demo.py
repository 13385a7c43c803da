"""`make demo`: the whole loraplex loop on this machine, no GPU, no Docker.

    python e2e/demo.py up      # provision + start the local cluster, install, deploy, answer
    python e2e/demo.py down    # stop everything it started

A real control plane (etcd, kube-apiserver, kube-controller-manager), the Helm chart (CRDs
and RBAC; the operator runs as a local `loraplex operator` process since no kubelet can run
its image), the local pod runner for the server pods (real `loraplex serve` processes on
loopback addresses), the generated tiny Llama with its LoRA adapters. State lives in
~/.cache/loraplex/demo (LORAPLEX_DEMO_STATE to move it); the tiny assets stay for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from loraplex.localcluster.binaries import cache_root
from loraplex.localcluster.control_plane import STATE_FILE, LocalCluster
from loraplex.localcluster.demo_workload import BASE_MODEL, build_workload, manifest
from loraplex.localcluster.install import install_chart
from loraplex.localcluster.processes import ManagedProcess, free_ports, pid_alive, stop_group

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("LORAPLEX_DEMO_STATE", cache_root() / "demo"))
NAMESPACE, RELEASE, RELEASE_NAMESPACE = "demo", "loraplex", "loraplex-system"
ADAPTERS = ("sql", "chat", "poem")  # e2e/demo/adapters.yaml
LIVE_ADAPTER = "haiku"  # e2e/demo/adapter-live.yaml
PROMPT = "the model serves"
WAIT_S = 300
SERVER_PODS = "app.kubernetes.io/name=loraplex-server"  # the label of every server pod


def step(message: str) -> None:
    print(f"\n\033[1m==> {message}\033[0m", flush=True)


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    return cluster.kubectl(*args, input=input).stdout


def start_cluster() -> LocalCluster:
    workdir = STATE / "cluster"
    if (workdir / STATE_FILE).is_file():
        running = LocalCluster.attach(workdir)
        if running.is_ready():
            return running
        running.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return LocalCluster.start(with_controllers=True, workdir=workdir, tie_to_parent=False)


def spawn(name: str, argv: list[str], cluster: LocalCluster, env: dict[str, str] | None = None) -> None:
    """A background process of the demo (stopped by `down`), unless it already runs."""
    pids = _pids()
    if name in pids and pid_alive(pids[name]):
        return
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    os.environ.update(env or {})
    process = ManagedProcess.spawn(name, argv, STATE / f"{name}.log", tie_to_parent=False)
    pids[name] = process.pid
    (STATE / "pids.json").write_text(json.dumps(pids))


def _pids() -> dict[str, int]:
    path = STATE / "pids.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def start_operator_and_runner(cluster: LocalCluster) -> None:
    bin_dir = Path(sys.executable).parent
    liveness = f"http://127.0.0.1:{free_ports(1)[0]}/healthz"
    # Cluster-wide, so `make e2e` can run its own namespace against the demo cluster.
    operator = [str(bin_dir / "loraplex"), "operator", "--all-namespaces", "--liveness", liveness]
    spawn("operator", operator, cluster, {"LORAPLEX_TICK_SECONDS": "5"})
    runner = [sys.executable, "-m", "loraplex.localcluster", "pods", "--selector", SERVER_PODS]
    runner += ["--state-dir", str(STATE / "pods"), "--env", "OMP_NUM_THREADS=1", "--env", "LOG_FORMAT=text"]
    spawn("pod-runner", runner, cluster)


def custom(cluster: LocalCluster, kind: str, name: str) -> dict[str, Any]:
    text = cluster.kubectl("get", "-n", NAMESPACE, kind, name, "-o", "json", check=False).stdout
    return json.loads(text).get("status", {}) if text else {}


def wait_ready(cluster: LocalCluster, adapters: tuple[str, ...], replicas: int = 2) -> None:
    """Poll until the base model and `adapters` are Ready on every replica, printing changes."""
    deadline, last = time.monotonic() + WAIT_S, ""
    while time.monotonic() < deadline:
        bmd = custom(cluster, "bmd", BASE_MODEL)
        parts = [f"{BASE_MODEL}: {bmd.get('phase', '-')} {bmd.get('readyReplicas', 0)}/{replicas} pods"]
        statuses = {name: custom(cluster, "lora", name) for name in adapters}
        parts += [
            f"{n}: {s.get('phase', '-')} {s.get('readyReplicas', 0)}/{replicas}" for n, s in statuses.items()
        ]
        line = " | ".join(parts)
        if line != last:
            print(f"  [{time.strftime('%H:%M:%S')}] {line}", flush=True)
            last = line
        if all(s.get("phase") == "Ready" and s.get("readyReplicas") == replicas for s in statuses.values()):
            return
        time.sleep(1)
    raise SystemExit(f"not Ready after {WAIT_S}s; logs in {STATE}")


def endpoints(cluster: LocalCluster) -> list[str]:
    """`ip:port` of the Service's ready endpoints, as a Service proxy would pick them."""
    text = kubectl(
        cluster,
        "get",
        "endpointslices",
        "-n",
        NAMESPACE,
        "-l",
        f"kubernetes.io/service-name={BASE_MODEL}",
        "-o",
        "json",
    )
    found = []
    for item in json.loads(text)["items"]:
        port = item["ports"][0]["port"]
        for endpoint in item.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready"):
                found += [f"{address}:{port}" for address in endpoint["addresses"]]
    return sorted(found)


def generate(address: str, adapter: str | None) -> str:
    """The answer as text and token ids (a random-weight model writes odd bytes)."""
    parameters = {"max_new_tokens": 8, "details": True, **({"adapter_id": adapter} if adapter else {})}
    body = json.dumps({"inputs": PROMPT, "parameters": parameters}).encode()
    request = urllib.request.Request(f"http://{address}/generate", body, {"Content-Type": "application/json"})
    for _ in range(60):  # 401 until the pod's mounted access Secret names a just-loaded adapter
        try:
            with urllib.request.urlopen(request, timeout=60) as reply:
                answer = json.loads(reply.read())
                break
        except urllib.error.HTTPError as error:
            if error.code != 401:
                raise
            time.sleep(1)
    else:
        raise SystemExit(f"{adapter} still refused (401) on {address}")
    ids = [token["id"] for token in answer["details"]["tokens"]]
    return f"{answer['generated_text']!r:<40} tokens {ids}"


def show_answers(cluster: LocalCluster, adapters: tuple[str | None, ...]) -> None:
    addresses = endpoints(cluster)
    print(f"  Service {BASE_MODEL} endpoints: {', '.join(addresses)}")
    print(f"  prompt: {PROMPT!r}")
    for index, adapter in enumerate(adapters):
        address = addresses[index % len(addresses)]  # spread over the pods, as the Service would
        print(f"  {adapter or '(base model)':>14} via {address}: {generate(address, adapter)}")


def quietly(function: Any, *args: Any) -> Any:
    """Run without transformers' progress bars and deprecation warnings."""
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return function(*args)


def up() -> int:
    started = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    step("Provisioning the local cluster binaries (cached after the first run)")
    subprocess.run(["bash", str(REPO / "e2e" / "cluster" / "provision.sh")], check=True)
    step("Starting etcd, kube-apiserver and kube-controller-manager")
    cluster = start_cluster()
    print(f"  API server {cluster.server}")
    step("Installing the Helm chart (CRDs, RBAC) and starting the operator and the pod runner")
    install_chart(cluster, RELEASE, RELEASE_NAMESPACE)
    start_operator_and_runner(cluster)
    step("Building the tiny Llama and its LoRA adapters (cached)")
    workload = quietly(build_workload, STATE / "assets")
    step(f"Deploying {BASE_MODEL} (2 replicas) and adapters {', '.join(ADAPTERS)}")
    kubectl(
        cluster, "apply", "-f", "-", input=f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}"
    )
    for name in ("base-model.yaml", "adapters.yaml"):
        kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", input=manifest(name, workload))
    wait_ready(cluster, ADAPTERS)
    step("Generating through the Service's endpoints, once per adapter")
    show_answers(cluster, (None, *ADAPTERS))
    step(f"kubectl get bmd,lora -n {NAMESPACE}")
    print(kubectl(cluster, "get", "bmd,lora", "-n", NAMESPACE))
    step(f"Hot-loading a fourth adapter ({LIVE_ADAPTER}) into the running pods")
    kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", input=manifest("adapter-live.yaml", workload))
    wait_ready(cluster, (LIVE_ADAPTER,))
    show_answers(cluster, (LIVE_ADAPTER, LIVE_ADAPTER))
    print(kubectl(cluster, "get", "pods", "-n", NAMESPACE, "-o", "wide"))
    step(f"Done in {time.monotonic() - started:.0f}s. Try it:")
    print(f"  export KUBECONFIG={cluster.kubeconfig}\n  kubectl get bmd,lora,pods -n {NAMESPACE}")
    print(f"  logs: {STATE}/*.log, {STATE}/pods/*/container.log\n  stop: make demo-down")
    return 0


def down() -> int:
    for name, pid in _pids().items():  # operator, then the runner (it stops the servers)
        if pid_alive(pid):
            stop_group(pid, timeout=60)
            print(f"stopped {name} (pid {pid})")
    (STATE / "pids.json").unlink(missing_ok=True)
    workdir = STATE / "cluster"
    if (workdir / STATE_FILE).is_file():
        LocalCluster.attach(workdir).stop()
        print("stopped the local cluster")
    for path in ("cluster", "pods"):
        shutil.rmtree(STATE / path, ignore_errors=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("action", choices=("up", "down"))
    return {"up": up, "down": down}[parser.parse_args().action]()


if __name__ == "__main__":
    sys.exit(main())
