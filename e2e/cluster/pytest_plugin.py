"""pytest plugin: the session-scoped `local_cluster` fixture (a real control plane).

Enable with `pytest_plugins = ["loraplex.localcluster.pytest_plugin"]` in a conftest, or
`pytest -p loraplex.localcluster.pytest_plugin`. Missing binaries fail the tests (never skip):
the envtest tier must not turn green without having run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

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
    with _kubeconfig_env(cluster.kubeconfig):
        try:
            yield cluster
        finally:
            cluster.stop()


@contextlib.contextmanager
def _kubeconfig_env(path: Path) -> Iterator[None]:
    """Point KUBECONFIG at `path`, including for a `kubernetes` package imported earlier."""
    from kubernetes.config import kube_config

    # kube_config reads $KUBECONFIG once, at import (before any fixture runs), so kopf's
    # `login_via_client` would otherwise miss the local cluster.
    saved = os.environ.get("KUBECONFIG"), kube_config.KUBE_CONFIG_DEFAULT_LOCATION
    os.environ["KUBECONFIG"] = kube_config.KUBE_CONFIG_DEFAULT_LOCATION = str(path)
    try:
        yield
    finally:
        if saved[0] is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = saved[0]
        kube_config.KUBE_CONFIG_DEFAULT_LOCATION = saved[1]
