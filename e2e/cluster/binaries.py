"""Where the control plane's binaries live: the provisioning cache or KUBEBUILDER_ASSETS."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROVISION_COMMAND = "bash e2e/cluster/provision.sh"
NAMES = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl", "helm")


class BinariesMissing(RuntimeError):
    """A binary the control plane needs is not provisioned."""


def cache_root() -> Path:
    """`$LORAPLEX_CACHE`, default `~/.cache/loraplex` (the same rule as provision.sh)."""
    return Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache" / "loraplex")


def bin_dir() -> Path:
    return cache_root() / "k8s" / "bin"


def _search_dirs() -> list[Path]:
    # KUBEBUILDER_ASSETS wins, as in controller-runtime's envtest.
    dirs = [Path(assets)] if (assets := os.environ.get("KUBEBUILDER_ASSETS")) else []
    return [*dirs, bin_dir()]


def find_binary(name: str) -> Path:
    """The executable `name`, or BinariesMissing saying how to provision it."""
    for directory in _search_dirs():
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    searched = ", ".join(str(d) for d in _search_dirs())
    raise BinariesMissing(f"{name} not found in {searched}; run `{PROVISION_COMMAND}` first")


@dataclass(frozen=True)
class Binaries:
    etcd: Path
    kube_apiserver: Path
    kube_controller_manager: Path | None
    kubectl: Path

    @classmethod
    def find(cls, with_controllers: bool = True) -> Binaries:
        """All binaries a cluster needs; the controller-manager only when asked for."""
        return cls(
            etcd=find_binary("etcd"),
            kube_apiserver=find_binary("kube-apiserver"),
            kube_controller_manager=find_binary("kube-controller-manager") if with_controllers else None,
            kubectl=find_binary("kubectl"),
        )
