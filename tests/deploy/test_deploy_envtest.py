"""Every file under manifests/ is accepted by a real API server (server-side dry run), and the
chart installs into the local cluster and uninstalls cleanly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import IO

import pytest
import yaml
from chart_tools import CHART, CRDS, MANIFESTS, documents, helm

from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.processes import free_ports, wait_until

pytestmark = pytest.mark.envtest
MANIFEST_FILES = sorted(MANIFESTS.rglob("*.yaml"))
# kubectl validates on the client against the server's OpenAPI; before 1.25 (the local 1.20
# control plane) that knows no CEL rules, while the server itself drops the field. That error
# and no other is tolerated (then the file is sent with --validate=false); see crds/README.md.
CEL_FIELD = 'unknown field "x-kubernetes-validations"'


def _apply_dry_run(cluster: LocalCluster, path: Path, namespace: str) -> str:
    args = ["apply", "--dry-run=server", "-f", str(path)]
    if not any(doc["metadata"].get("namespace") for doc in documents(path)):
        args += ["--namespace", namespace]
    result = cluster.kubectl(*args, check=False)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
        assert errors and all(CEL_FIELD in line for line in errors), result.stderr
        result = cluster.kubectl(*args, "--validate=false")
    return result.stdout


def _established(cluster: LocalCluster, name: str) -> bool:
    crd = json.loads(cluster.kubectl("get", "crd", name, "-o", "json").stdout)
    return any(
        c["type"] == "Established" and c["status"] == "True" for c in crd["status"].get("conditions", [])
    )


@pytest.fixture(scope="module")
def cluster(local_cluster: LocalCluster) -> LocalCluster:
    """The local cluster with our CRDs and the install namespace (dry runs of custom objects
    and namespaced objects need both to exist)."""
    for path in sorted(CRDS.glob("*.yaml")):
        _apply_dry_run(local_cluster, path, "default")  # the same tolerance as for every file
        local_cluster.kubectl("apply", "--validate=false", "-f", str(path))
        assert wait_until(lambda p=path: _established(local_cluster, documents(p)[0]["metadata"]["name"]), 30)
    for namespace in ("loraplex-system", "deploy-dry-run"):
        if local_cluster.kubectl("get", "namespace", namespace, check=False).returncode != 0:
            local_cluster.kubectl("create", "namespace", namespace)
    return local_cluster


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=[str(p.relative_to(MANIFESTS)) for p in MANIFEST_FILES])
def test_manifest_passes_server_dry_run(cluster: LocalCluster, path: Path) -> None:
    out = _apply_dry_run(cluster, path, "deploy-dry-run")
    assert out.count("(server dry run)") == len(documents(path)), out


def test_helm_install_and_uninstall(cluster: LocalCluster) -> None:
    namespace = f"helm-{uuid.uuid4().hex[:6]}"
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    # --server-side=false: Helm 4's server-side apply refuses CEL fields on a pre-1.25 server.
    helm(
        "install", "lp", str(CHART), kubeconfig, "--namespace", namespace, "--create-namespace",
        "--server-side=false", "--set", "scope=namespace", "--set", "samples.enabled=true",
    )  # fmt: skip
    try:
        for kind in (
            "deployment/loraplex-operator",
            "serviceaccount/loraplex-operator",
            "role/loraplex-operator",
        ):
            cluster.kubectl("get", "--namespace", namespace, kind)
        objects = cluster.kubectl("get", "bmd,lora", "--namespace", namespace, "-o", "name").stdout.split()
        assert sorted(objects) == [
            "basemodeldeployment.loraplex.dev/qwen2-5-0-5b-instruct",
            "loraadapter.loraplex.dev/chatbot",
        ]
        status = json.loads(helm("status", "lp", kubeconfig, "--namespace", namespace, "-o", "json").stdout)
        assert status["info"]["status"] == "deployed"
    finally:
        # --no-hooks: no kubelet here runs the uninstall hook's Job; what it runs,
        # `loraplex operator release`, is tested in tests/operator/test_release_envtest.py
        helm(
            "uninstall",
            "lp",
            kubeconfig,
            "--namespace",
            namespace,
            "--wait",
            "--timeout",
            "60s",
            "--no-hooks",
        )
    left = cluster.kubectl("get", "deployment,bmd,lora,role", "--namespace", namespace, "-o", "name").stdout
    assert left.strip() == ""
    assert (
        cluster.kubectl("get", "clusterrole", f"loraplex-operator-{namespace}", check=False).returncode != 0
    )
    for path in CRDS.glob("*.yaml"):  # Helm never deletes CRDs: the custom objects elsewhere survive
        cluster.kubectl("get", "crd", documents(path)[0]["metadata"]["name"])
    cluster.kubectl("delete", "namespace", namespace, "--wait=false")


def _service_account_kubeconfig(cluster: LocalCluster, namespace: str, path: Path) -> Path:
    """A kubeconfig that authenticates as the chart's operator ServiceAccount."""
    token = cluster.kubectl("create", "token", "loraplex-operator", "--namespace", namespace).stdout.strip()
    config = yaml.safe_load(Path(cluster.kubeconfig).read_text())
    for user in config["users"]:
        user["user"] = {"token": token}
    path.write_text(yaml.safe_dump(config))
    return path


def _exists(cluster: LocalCluster, namespace: str, *kinds: str) -> bool:
    return all(
        cluster.kubectl("get", kind, "--namespace", namespace, check=False).returncode == 0 for kind in kinds
    )


def test_operator_runs_under_the_chart_rbac(cluster: LocalCluster, tmp_path: Path) -> None:
    """Namespace scope (its rules are the cluster scope's, split): the operator renders every
    child, writes status and releases its finalizers without a single 403."""
    namespace = f"rbac-{uuid.uuid4().hex[:6]}"
    kubeconfig = f"--kubeconfig={cluster.kubeconfig}"
    helm(
        "install", "lp", str(CHART), kubeconfig, "--namespace", namespace, "--create-namespace",
        "--server-side=false", "--set", "scope=namespace", "--set", "operator.enabled=false",
    )  # fmt: skip
    env = {**os.environ, "KUBECONFIG": str(_service_account_kubeconfig(cluster, namespace, tmp_path / "sa"))}
    (port,) = free_ports(1)
    log = (tmp_path / "operator.log").open("w+")
    command = [sys.executable, "-m", "loraplex.cli", "operator", "--namespace", namespace]
    operator = subprocess.Popen(
        [*command, f"--liveness=http://127.0.0.1:{port}/healthz"], env=env, stdout=log, stderr=log
    )
    try:
        cluster.kubectl("apply", "--namespace", namespace, "-f", str(MANIFESTS / "samples"))
        base = "qwen2-5-0-5b-instruct"
        children = [
            f"deployment/{base}",
            f"service/{base}",
            f"configmap/{base}-adapters",
            f"secret/{base}-access",
        ]
        assert wait_until(lambda: _exists(cluster, namespace, *children), 60), log_tail(log)
        phase = ["get", "bmd", base, "--namespace", namespace, "-o", "jsonpath={.status.phase}"]
        assert wait_until(lambda: cluster.kubectl(*phase).stdout != "", 30), log_tail(log)
        # Adapters first, then the base: the operator's finalizer on the base must come off.
        for kind in ("lora", "bmd"):
            cluster.kubectl("delete", kind, "--all", "--namespace", namespace, "--timeout=40s")
    finally:
        operator.terminate()
        operator.wait(timeout=30)
        helm("uninstall", "lp", kubeconfig, "--namespace", namespace)
        cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert "Forbidden" not in log_tail(log, 10**7)


def log_tail(log: IO[str], size: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-size:]
