"""CI runs the e2e suite (`e2e/`) unchanged on the local cluster: the chart installed with Helm,
the operator in this process, the server pods run by the local pod runner, and the suite as a
separate pytest driven only by KUBECONFIG and its LORAPLEX_E2E_* settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kopf.testing import KopfRunner

from loraplex.localcluster.binaries import find_binary
from loraplex.localcluster.control_plane import LocalCluster
from loraplex.localcluster.install import install_chart
from loraplex.localcluster.pod_runner import PodRunner
from loraplex.server.demo_training import TrainedAssets

pytestmark = pytest.mark.envtest
REPO = Path(__file__).resolve().parents[2]


def test_the_e2e_suite_passes_on_the_local_cluster(
    local_cluster: LocalCluster, trained_assets: TrainedAssets, tmp_path: Path
) -> None:
    install_chart(local_cluster)
    namespace = f"e2e-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", namespace)
    operator_args = ["run", "--standalone", "--namespace", namespace, "-m", "loraplex.operator.handlers"]
    env = {
        **os.environ,
        "KUBECONFIG": str(local_cluster.kubeconfig),
        "LORAPLEX_E2E_ACCESS": "endpoints",
        "LORAPLEX_E2E_NAMESPACE": namespace,
        "LORAPLEX_E2E_ASSETS": str(trained_assets.root.parent),  # trained once, reused
        "LORAPLEX_E2E_TIMEOUT": "120",
        "LORAPLEX_E2E_KUBECTL": str(find_binary("kubectl")),
    }
    pods_env = {"OMP_NUM_THREADS": "1", "LOG_FORMAT": "text", "LOG_LEVEL": "warning"}
    with (
        local_cluster.api_client() as api,
        PodRunner(api, tmp_path / "pods", (namespace,), extra_env=pods_env),
        KopfRunner(operator_args, timeout=90, env={"LORAPLEX_TICK_SECONDS": "2"}) as operator,
    ):
        suite = subprocess.run(
            [sys.executable, "-m", "pytest", "e2e", "-q", "-p", "no:cacheprovider"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    local_cluster.kubectl("delete", "namespace", namespace, "--wait=false")
    assert suite.returncode == 0, suite.stdout[-6000:] + suite.stderr[-2000:]
    assert re.search(r"^4 passed", suite.stdout, re.MULTILINE), suite.stdout[-2000:]
    assert operator.exception is None, operator.output
