"""Packaging contract of DESIGN.md §1: one distribution, three mapped folders, no stdlib clash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_stdlib_operator_wins_from_repo_root() -> None:
    result = _run(sys.executable, "-c", "import operator, collections; print(operator.__file__)")
    assert result.returncode == 0, result.stderr
    assert "site-packages" not in result.stdout and not result.stdout.startswith(str(REPO))


@pytest.mark.parametrize("folder", ["operator", "server", "kernels"])
def test_top_folders_are_not_regular_packages(folder: str) -> None:
    assert not (REPO / folder / "__init__.py").exists()


@pytest.mark.parametrize("name", ["loraplex.operator", "loraplex.server", "loraplex.kernels"])
def test_mapped_import_names(name: str, tmp_path: Path) -> None:
    code = f"import importlib; m = importlib.import_module({name!r}); print(list(m.__path__)[0])"
    result = _run(sys.executable, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).resolve().parent == REPO


def test_cli_help_and_version() -> None:
    cli = Path(sys.executable).with_name("loraplex")
    version = _run(str(cli), "--version")
    assert version.returncode == 0 and version.stdout.startswith("loraplex "), version
    help_text = _run(str(cli), "--help")
    assert help_text.returncode == 0 and "usage: loraplex" in help_text.stdout
