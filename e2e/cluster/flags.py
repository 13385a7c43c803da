"""Command lines and kubeconfig of the local control plane: pure functions of paths and ports."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.localcluster.binaries import Binaries
from loraplex.localcluster.certs import Pki

SERVICE_CLUSTER_IP_RANGE = "10.0.0.0/24"
SERVICE_ACCOUNT_ISSUER = "https://kubernetes.default.svc.cluster.local"
CONTEXT_NAME = "loraplex-local"
# What operators and their tests lean on. Left out: podgc (it deletes pods bound to nodes that
# don't exist, i.e. those of a local pod runner), node lifecycle, cloud and CSR controllers.
CONTROLLERS = (
    "deployment",
    "replicaset",
    "garbagecollector",
    "namespace",
    "serviceaccount",
    "serviceaccount-token",
    "endpoint",
    "endpointslice",
    "disruption",
    "job",
    "statefulset",
    "root-ca-cert-publisher",
)


@dataclass(frozen=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int


@dataclass(frozen=True)
class Layout:
    """Where one cluster keeps its files under its work directory."""

    workdir: Path

    @property
    def etcd_data(self) -> Path:
        return self.workdir / "etcd"

    @property
    def tokens(self) -> Path:
        return self.workdir / "tokens.csv"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    @property
    def pki_dir(self) -> Path:
        return self.workdir / "pki"

    @property
    def logs(self) -> Path:
        return self.workdir / "logs"


def etcd_args(binaries: Binaries, layout: Layout, ports: Ports) -> list[str]:
    client = f"http://127.0.0.1:{ports.etcd_client}"
    peer = f"http://127.0.0.1:{ports.etcd_peer}"
    return [
        str(binaries.etcd),
        "--name=loraplex",
        f"--data-dir={layout.etcd_data}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=loraplex={peer}",
        "--log-level=warn",
    ]


def apiserver_args(binaries: Binaries, layout: Layout, pki: Pki, ports: Ports) -> list[str]:
    return [
        str(binaries.kube_apiserver),
        f"--etcd-servers=http://127.0.0.1:{ports.etcd_client}",
        f"--secure-port={ports.apiserver}",
        "--bind-address=127.0.0.1",
        "--advertise-address=127.0.0.1",
        # 1.20 still has an insecure port; a fixed default would collide between clusters.
        "--insecure-port=0",
        f"--cert-dir={layout.workdir / 'apiserver-certs'}",
        f"--tls-cert-file={pki.serving_cert}",
        f"--tls-private-key-file={pki.serving_key}",
        f"--client-ca-file={pki.ca_cert}",
        f"--service-account-issuer={SERVICE_ACCOUNT_ISSUER}",
        f"--service-account-key-file={pki.sa_pub}",
        f"--service-account-signing-key-file={pki.sa_key}",
        f"--token-auth-file={layout.tokens}",
        "--authorization-mode=RBAC",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
        "--allow-privileged=true",
    ]


def controller_manager_args(binaries: Binaries, layout: Layout, pki: Pki, ports: Ports) -> list[str]:
    if binaries.kube_controller_manager is None:
        raise ValueError("kube-controller-manager binary not resolved")
    return [
        str(binaries.kube_controller_manager),
        f"--kubeconfig={layout.kubeconfig}",
        f"--authentication-kubeconfig={layout.kubeconfig}",
        f"--authorization-kubeconfig={layout.kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={ports.controller_manager}",
        "--port=0",
        f"--cert-dir={layout.workdir / 'controller-manager-certs'}",
        "--leader-elect=false",
        f"--controllers={','.join(CONTROLLERS)}",
        f"--service-account-private-key-file={pki.sa_key}",
        f"--root-ca-file={pki.ca_cert}",
        f"--service-cluster-ip-range={SERVICE_CLUSTER_IP_RANGE}",
    ]


def token_file_line(token: str) -> str:
    """The admin user of the static token file: group system:masters bypasses RBAC."""
    return f'{token},loraplex-admin,loraplex-admin,"system:masters"\n'


def kubeconfig(server: str, ca_cert_pem: bytes, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": CONTEXT_NAME,
                "cluster": {
                    "server": server,
                    "certificate-authority-data": base64.b64encode(ca_cert_pem).decode(),
                },
            }
        ],
        "users": [{"name": "loraplex-admin", "user": {"token": token}}],
        "contexts": [
            {
                "name": CONTEXT_NAME,
                "context": {"cluster": CONTEXT_NAME, "user": "loraplex-admin", "namespace": "default"},
            }
        ],
        "current-context": CONTEXT_NAME,
    }
