"""`python -m loraplex.localcluster up|status|down` and the pytest fixture's failure mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.localcluster.processes import pid_alive


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "loraplex.localcluster", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


@pytest.mark.envtest
def test_up_leaves_a_cluster_running_that_down_stops(tmp_path: Path) -> None:
    state_dir = tmp_path / "cluster"
    up = _cli("up", "--no-controllers", "--state-dir", str(state_dir))
    assert up.returncode == 0, up.stderr
    assert f"export KUBECONFIG={state_dir / 'kubeconfig'}" in up.stdout
    pids = json.loads((state_dir / "state.json").read_text())["pids"]
    try:
        # The processes outlived the `up` command that started them.
        assert all(pid_alive(pid) for pid in pids.values())
        status = _cli("status", "--state-dir", str(state_dir))
        assert status.returncode == 0 and status.stdout.startswith("ready"), status.stdout
        assert "already running" in _cli("up", "--no-controllers", "--state-dir", str(state_dir)).stdout
    finally:
        down = _cli("down", "--state-dir", str(state_dir))
    assert down.returncode == 0, down.stderr
    assert not any(pid_alive(pid) for pid in pids.values())
    assert not state_dir.exists()
    assert _cli("status", "--state-dir", str(state_dir)).stdout.strip() == "down"


def test_fixture_fails_rather_than_skips_without_binaries(tmp_path: Path) -> None:
    (tmp_path / "test_needs_cluster.py").write_text("def test_it(local_cluster):\n    pass\n")
    env = {k: v for k, v in os.environ.items() if k != "KUBEBUILDER_ASSETS"}
    env["LORAPLEX_CACHE"] = str(tmp_path / "empty-cache")
    argv = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "loraplex.localcluster.pytest_plugin",
        "-p",
        "no:cacheprovider",
    ]
    result = subprocess.run(
        [*argv, "-q", "test_needs_cluster.py"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert result.returncode == 1, result.stdout
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert "run `bash e2e/cluster/provision.sh`" in result.stdout
