"""Install loraplex into the local cluster the way the e2e suite and `make demo` do: the Helm
chart `helm/loraplex` with its operator Deployment disabled (no kubelet runs images here; the
operator runs as a local process instead).

The chart's CRDs carry CEL rules that the local 1.20 API server cannot take (helm's server-side
apply fails on `x-kubernetes-validations`), so the same CRDs without CEL are applied first and
helm skips its own. The operator refuses what CEL would have (as conditions).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from loraplex.localcluster.binaries import find_binary
from loraplex.localcluster.control_plane import LocalCluster
from loraplex.operator import crdgen

CHART = Path(__file__).resolve().parents[2] / "helm" / "loraplex"


def apply_crds(cluster: LocalCluster) -> None:
    for crd in crdgen.all_crds(cel=False).values():
        cluster.kubectl("apply", "-f", "-", input=json.dumps(crd))
    cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


def install_chart(
    cluster: LocalCluster, release: str = "loraplex", namespace: str = "loraplex-system"
) -> None:
    """CRDs (no CEL) + `helm upgrade --install` of the chart without the operator Deployment."""
    apply_crds(cluster)
    argv = [str(find_binary("helm")), "upgrade", "--install", release, str(CHART)]
    argv += ["--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "--create-namespace"]
    argv += ["--skip-crds", "--set", "operator.enabled=false", "--wait", "--timeout", "2m"]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"helm install failed: {result.stderr.strip()}")
