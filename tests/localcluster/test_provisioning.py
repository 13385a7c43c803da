"""BackgroundProvision runs the real provision.sh beside other work (the cached binaries are
handed to it through KUBEBUILDER_ASSETS, so no build happens here)."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from loraplex.localcluster.binaries import NAMES, find_binary
from loraplex.localcluster.provisioning import LOG_ENV, BackgroundProvision, ProvisionFailed


@pytest.fixture
def assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory holding (links to) every provisioned binary, and an empty cache to fill."""
    directory = tmp_path / "assets"
    directory.mkdir()
    for name in NAMES:
        (directory / name).symlink_to(find_binary(name).resolve())
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(directory))
    monkeypatch.setenv("LORAPLEX_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(LOG_ENV, raising=False)
    return directory


def test_a_run_started_in_the_background_fills_the_cache_and_reports(assets: Path, tmp_path: Path) -> None:
    provisioning = BackgroundProvision.start(tmp_path / "state" / "provision.log")
    lines: list[str] = []
    provisioning.finish(lines.append)
    for name in NAMES:
        assert os.access(tmp_path / "cache" / "k8s" / "bin" / name, os.X_OK)
    relayed = "\n".join(lines)
    assert "using KUBEBUILDER_ASSETS" in relayed  # from the background run's log
    assert "ready in" in relayed
    assert all(line.startswith("  [provision") for line in lines)


def test_a_run_started_by_make_is_adopted_and_its_log_relayed(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "make-provision.log"
    log.write_text("[provision 00:00:00] kube-apiserver: building\nbuild noise\n")
    monkeypatch.setenv(LOG_ENV, str(log))
    provisioning = BackgroundProvision.start(tmp_path / "unused.log")
    assert provisioning.log == log
    lines: list[str] = []
    provisioning.finish(lines.append)
    assert "  [provision 00:00:00] kube-apiserver: building" in lines
    assert not any("build noise" in line for line in lines)
    assert not (tmp_path / "unused.log").exists()


def test_a_failed_run_raises_with_the_end_of_its_output(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(tmp_path / "no-such-dir"))
    provisioning = BackgroundProvision.start(tmp_path / "provision.log")
    with pytest.raises(ProvisionFailed, match="is not a directory"):
        provisioning.finish(lambda line: None)


def test_a_long_wait_for_the_build_says_so(
    assets: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While another run holds the provisioning lock (the background build), the wait is not silent."""
    log = tmp_path / "make-provision.log"
    log.write_text("[provision 00:00:00] kube-apiserver: building\n")
    monkeypatch.setenv(LOG_ENV, str(log))
    lock_path = tmp_path / "cache" / "k8s" / ".provision.lock"
    lock_path.parent.mkdir(parents=True)
    held = threading.Event()

    def hold_the_lock() -> None:
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            held.set()
            time.sleep(2.0)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    held.wait(10)
    lines: list[str] = []
    started = time.monotonic()
    BackgroundProvision.start(tmp_path / "unused.log").finish(lines.append, heartbeat_s=0.5)
    holder.join()
    assert time.monotonic() - started >= 1.5  # it did wait for the lock
    waits = [line for line in lines if "still provisioning" in line]
    assert waits and str(log) in waits[0]
    assert any("ready in" in line for line in lines)
