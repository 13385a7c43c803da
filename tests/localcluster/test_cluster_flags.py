"""Pure parts of the local control plane: binary lookup, command lines, kubeconfig."""

from __future__ import annotations

import base64
import tempfile
from pathlib import Path

import pytest

from loraplex.localcluster import flags
from loraplex.localcluster.binaries import Binaries, BinariesMissing, find_binary
from loraplex.localcluster.certs import Pki


def _executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)
    return path


def test_kubebuilder_assets_win_over_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cached = _executable(tmp_path / "cache" / "k8s" / "bin" / "etcd")
    assets = _executable(tmp_path / "assets" / "etcd")
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    assert find_binary("etcd") == cached
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets.parent))
    assert find_binary("etcd") == assets


def test_missing_binary_names_the_provision_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    with pytest.raises(BinariesMissing, match=r"etcd not found in .*; run `bash e2e/cluster/provision.sh`"):
        Binaries.find()


def _fixture_paths(tmp_path: Path) -> tuple[Binaries, flags.Layout, Pki, flags.Ports]:
    binaries = Binaries(*(tmp_path / name for name in ("etcd", "kube-apiserver", "kcm", "kubectl")))
    pki = Pki(
        *(tmp_path / "pki" / name for name in ("ca.crt", "ca.key", "s.crt", "s.key", "sa.key", "sa.pub"))
    )
    return binaries, flags.Layout(tmp_path), pki, flags.Ports(2001, 2002, 2003, 2004)


def test_apiserver_listens_on_loopback_with_rbac_and_no_insecure_port(tmp_path: Path) -> None:
    binaries, layout, pki, ports = _fixture_paths(tmp_path)
    args = flags.apiserver_args(binaries, layout, pki, ports)
    assert args[0] == str(binaries.kube_apiserver)
    for expected in (
        "--etcd-servers=http://127.0.0.1:2001",
        "--secure-port=2003",
        "--bind-address=127.0.0.1",
        "--insecure-port=0",
        "--authorization-mode=RBAC",
        f"--token-auth-file={layout.tokens}",
        f"--service-account-signing-key-file={pki.sa_key}",
    ):
        assert expected in args


def test_controller_manager_signs_tokens_with_the_apiservers_key_pair(tmp_path: Path) -> None:
    binaries, layout, pki, ports = _fixture_paths(tmp_path)
    args = flags.controller_manager_args(binaries, layout, pki, ports)
    assert f"--service-account-private-key-file={pki.sa_key}" in args
    assert f"--root-ca-file={pki.ca_cert}" in args
    assert "--secure-port=2004" in args and "--port=0" in args
    controllers = next(a for a in args if a.startswith("--controllers=")).split("=", 1)[1].split(",")
    assert {"deployment", "replicaset", "garbagecollector", "serviceaccount-token"} <= set(controllers)
    assert "podgc" not in controllers


def test_kubeconfig_carries_the_ca_and_an_admin_token() -> None:
    config = flags.kubeconfig("https://127.0.0.1:6443", b"PEM", "secret")
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == "https://127.0.0.1:6443"
    assert base64.b64decode(cluster["certificate-authority-data"]) == b"PEM"
    assert config["users"][0]["user"] == {"token": "secret"}
    assert flags.token_file_line("secret").endswith('"system:masters"\n')


def test_a_component_that_dies_fails_start_with_its_log_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from loraplex.localcluster.control_plane import ClusterStartError, LocalCluster

    assets = tmp_path / "assets"
    for name in ("kube-apiserver", "kubectl"):
        _executable(assets / name)
    _executable(assets / "etcd").write_text("#!/bin/sh\necho 'etcd: disk on fire' >&2\nexit 3\n")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    with pytest.raises(ClusterStartError, match=r"(?s)etcd exited; log .*etcd: disk on fire"):
        LocalCluster.start(with_controllers=False, timeout=10)
    scratch_dirs = (Path(tempfile.gettempdir()), Path("/dev/shm"))
    leftovers = [log for d in scratch_dirs for log in d.glob("loraplex-k8s-*/logs/etcd.log")]
    assert not [log for log in leftovers if "disk on fire" in log.read_text(errors="replace")]
