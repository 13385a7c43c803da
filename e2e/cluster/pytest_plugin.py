"""pytest plugin: the session-scoped `local_cluster` fixture (a real control plane).

Enable with `pytest_plugins = ["loraplex.localcluster.pytest_plugin"]` in a conftest, or
`pytest -p loraplex.localcluster.pytest_plugin`. Missing binaries fail the tests (never skip):
the envtest tier must not turn green without having run.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from loraplex.localcluster.binaries import PROVISION_COMMAND, BinariesMissing
from loraplex.localcluster.control_plane import LocalCluster


@pytest.fixture(scope="session")
def local_cluster() -> Iterator[LocalCluster]:
    """etcd + kube-apiserver + kube-controller-manager for the whole session.

    KUBECONFIG points at it while the session runs, so kopf and `kubernetes.config` find it.
    """
    try:
        cluster = LocalCluster.start(with_controllers=True)
    except BinariesMissing as exc:
        pytest.fail(
            f"{exc}\nThe envtest tests need the local control plane: run `{PROVISION_COMMAND}`.",
            pytrace=False,
        )
    previous = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
    try:
        yield cluster
    finally:
        if previous is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = previous
        cluster.stop()
