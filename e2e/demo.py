"""`make demo`: the whole loraplex loop on this machine, no GPU, no Docker.

    python e2e/demo.py up      # provision + start the local cluster, install, deploy, answer
    python e2e/demo.py down    # stop everything it started

A real control plane (etcd, kube-apiserver, kube-controller-manager), the Helm chart (CRDs
and RBAC; the operator runs as a local `loraplex operator` process since no kubelet can run
its image), the local pod runner for the server pods (real `loraplex serve` processes on
loopback addresses), and a tiny Llama with four LoRA fine-tunes (sql, support, poem, haiku)
trained here on the project's own corpus (server/demo_training.py). State lives in
~/.cache/loraplex/demo (LORAPLEX_DEMO_STATE to move it); the trained models stay in
~/.cache/loraplex/demo-assets/<hash of corpus and code> for the next run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from loraplex.localcluster.binaries import cache_root
from loraplex.localcluster.control_plane import STATE_FILE, LocalCluster
from loraplex.localcluster.demo_wait import NotServing, Target, wait_until_serving
from loraplex.localcluster.demo_workload import BASE_MODEL, LIVE, SERVED, build_workload, manifest
from loraplex.localcluster.install import install_chart
from loraplex.localcluster.processes import ManagedProcess, free_ports, pid_alive, stop_group
from loraplex.localcluster.provisioning import BackgroundProvision, ProvisionFailed

STATE = Path(os.environ.get("LORAPLEX_DEMO_STATE", cache_root() / "demo"))
NAMESPACE, RELEASE, RELEASE_NAMESPACE = "demo", "loraplex", "loraplex-system"
REPLICAS = 2  # e2e/demo/base-model.yaml
PROMPTS = ("How many orders shipped last week?", "Why is the sea blue?")
MAX_TOKENS = 48
WAIT_S = 300
SERVER_PODS = "app.kubernetes.io/name=loraplex-server"  # the label of every server pod


def step(message: str) -> None:
    print(f"\n\033[1m==> {message}\033[0m", flush=True)


def say(line: str) -> None:
    print(line, flush=True)


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


def wait_serving(cluster: LocalCluster, adapters: tuple[str, ...]) -> tuple[str, ...]:
    """The Service's ready endpoints, once the base and `adapters` answer on every one."""
    target = Target(NAMESPACE, BASE_MODEL, adapters, REPLICAS)
    try:
        return wait_until_serving(lambda *args: kubectl(cluster, *args), target, WAIT_S, say)
    except NotServing as error:
        raise SystemExit(f"{error}\nlogs: {STATE}/*.log, {STATE}/pods/*/container.log") from None


def chat(address: str, model: str, question: str) -> str:
    """The model's greedy answer to one user message (OpenAI chat API, the chat template)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    request = urllib.request.Request(
        f"http://{address}/v1/chat/completions",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())["choices"][0]["message"]["content"].strip()


def show_answers(addresses: tuple[str, ...], models: tuple[str, ...]) -> None:
    """Each question to the base and to every adapter in `models`, side by side; requests take
    turns over the Service's endpoints, as the Service would spread them."""
    if not addresses:  # wait_serving never returns without; a guard, not a code path
        raise SystemExit(f"Service {BASE_MODEL} has no ready endpoints")
    say(f"  Service {BASE_MODEL}: endpoints {', '.join(addresses)} (requests take turns)")
    turn = 0
    for question in PROMPTS:
        say(f"\n  Q: {question}")
        for model in (BASE_MODEL, *models):
            answer = chat(addresses[turn % len(addresses)], model, question)
            turn += 1
            label = f"{model} (base)" if model == BASE_MODEL else model
            lines = answer.splitlines() or [""]
            say(f"    {label:<18} {lines[0]}")
            for line in lines[1:]:
                say(f"    {'':<18} {line}")


def show_tokens(cluster: LocalCluster, adapters: tuple[str, ...], timeout_s: float = 30) -> None:
    """`status.tokens` of each adapter, summed by the operator over the pods' reports (it
    refreshes them on its tick, so wait briefly until every adapter shows its traffic)."""
    deadline = time.monotonic() + timeout_s
    while True:
        listed = json.loads(kubectl(cluster, "get", "lora", "-n", NAMESPACE, "-o", "json"))
        tokens = {
            item["metadata"]["name"]: (item.get("status") or {}).get("tokens") or {}
            for item in listed["items"]
        }
        if all(tokens.get(name, {}).get("generated") for name in adapters) or time.monotonic() > deadline:
            break
        time.sleep(1)
    say(f"  {'adapter':<10} {'prompt tokens':>14} {'generated tokens':>17}")
    for name in adapters:
        counts = tokens.get(name, {})
        say(f"  {name:<10} {counts.get('prompt', 0):>14} {counts.get('generated', 0):>17}")


def up() -> int:
    started = time.monotonic()
    STATE.mkdir(parents=True, exist_ok=True)
    # The control-plane build (minutes, once per machine) runs beside the training.
    provisioning = BackgroundProvision.start(STATE / "provision.log")
    step("Training the tiny Llama and its four LoRA fine-tunes (about a minute, cached after)")
    say(f"  meanwhile the local cluster binaries are provisioned in the background: {provisioning.log}")
    workload = build_workload(report=say)
    say(f"  base model {workload.model_dir}")
    step("Provisioning the local cluster binaries (built once, cached after)")
    try:
        provisioning.finish(say)
    except ProvisionFailed as failed:
        say(str(failed))
        return 1
    step("Starting etcd, kube-apiserver and kube-controller-manager")
    cluster = start_cluster()
    say(f"  API server {cluster.server}")
    step("Installing the Helm chart (CRDs, RBAC) and starting the operator and the pod runner")
    install_chart(cluster, RELEASE, RELEASE_NAMESPACE)
    start_operator_and_runner(cluster)
    step(f"Deploying {BASE_MODEL} ({REPLICAS} replicas) and adapters {', '.join(SERVED)}")
    namespace = f"apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}"
    kubectl(cluster, "apply", "-f", "-", input=namespace)
    for name in ("base-model.yaml", "adapters.yaml"):
        kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", input=manifest(name, workload))
    say("  waiting for: the base Ready on every replica, the Service's endpoints, every adapter answering")
    addresses = wait_serving(cluster, SERVED)
    step("One deployment, many fine-tunes: the same questions to the base and to each adapter")
    show_answers(addresses, SERVED)
    step(f"kubectl get bmd,lora -n {NAMESPACE}")
    say(kubectl(cluster, "get", "bmd,lora", "-n", NAMESPACE))
    step(f"Hot-loading a fourth adapter ({LIVE}) into the running pods: no restart")
    applied = time.monotonic()
    kubectl(cluster, "apply", "-n", NAMESPACE, "-f", "-", input=manifest("adapter-live.yaml", workload))
    addresses = wait_serving(cluster, (*SERVED, LIVE))
    say(f"  {LIVE} answering on every pod {time.monotonic() - applied:.0f}s after kubectl apply")
    show_answers(addresses, (LIVE,))
    say("\n" + kubectl(cluster, "get", "pods", "-n", NAMESPACE, "-o", "wide"))
    step("Tokens served per adapter (status.tokens, summed over the pods by the operator)")
    show_tokens(cluster, (*SERVED, LIVE))
    step(f"Done in {time.monotonic() - started:.0f}s. Try it:")
    say(f"  export KUBECONFIG={cluster.kubeconfig}\n  kubectl get bmd,lora,pods -n {NAMESPACE}")
    say(f"  logs: {STATE}/*.log, {STATE}/pods/*/container.log\n  stop: make demo-down")
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
