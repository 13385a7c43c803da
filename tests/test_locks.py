"""The lock files agree with pyproject.toml, with each other and with the environment the tests run in."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("locks_update", REPO / "locks" / "update.py")
update = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(update)

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LINUX_311 = {
    "platform_system": "Linux",
    "sys_platform": "linux",
    "platform_machine": "x86_64",
    "python_version": "3.11",
    "python_full_version": "3.11.11",
    "os_name": "posix",
    "implementation_name": "cpython",
    "platform_python_implementation": "CPython",
}
STACK = ("torch", "triton", "transformers", "peft", "safetensors", "tokenizers")


def _pins(name: str) -> dict[str, str]:
    return update.pins(REPO / "locks" / f"{name}.txt")


def _requirements(target: str) -> list[Requirement]:
    extras, _, _ = update.TARGETS[target]
    if extras is None:
        return [Requirement(line) for line in update.operator_requirements()]
    found = [Requirement(line) for line in PYPROJECT["project"]["dependencies"]]
    for extra in extras:
        found += [Requirement(line) for line in PYPROJECT["project"]["optional-dependencies"][extra]]
    if "test" in extras:
        found += [Requirement(line) for line in update.no_deps_requirements()]
    return [req for req in found if req.marker is None or req.marker.evaluate({**LINUX_311, "extra": ""})]


@pytest.mark.parametrize("target", list(update.TARGETS))
def test_every_requirement_is_pinned_within_its_range(target: str) -> None:
    pins = _pins(target)
    problems = []
    for req in _requirements(target):
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req} is not in locks/{target}.txt")
        elif not req.specifier.contains(Version(pins[name]), prereleases=True):
            problems.append(f"{req} but locks/{target}.txt pins {name}=={pins[name]}")
    assert not problems, "pyproject.toml and the lock disagree (run `make lock`):\n" + "\n".join(problems)


@pytest.mark.parametrize("target", list(update.TARGETS))
def test_every_pin_carries_hashes(target: str) -> None:
    text = (REPO / "locks" / f"{target}.txt").read_text()
    blocks = [b for b in text.split("\n") if b and not b[0].isspace() and not b.startswith("#")]
    assert blocks, f"locks/{target}.txt is empty"
    for line in blocks:
        assert "==" in line and line.rstrip().endswith("\\"), f"{line!r}: not pinned with a hash"
    assert text.count("--hash=sha256:") >= len(blocks)


def test_one_stack_everywhere() -> None:
    cuda, cpu, dev = _pins("server-cuda"), _pins("server-cpu"), _pins("dev")
    for name in STACK:
        assert Version(cuda[name]).public == Version(cpu[name]).public == Version(dev[name]).public, name
    assert (
        cuda["torch"] == update.TORCH_VERSION
        and cpu["torch"] == dev["torch"] == f"{update.TORCH_VERSION}+cpu"
    )


def test_one_cuda_line() -> None:
    cuda = _pins("server-cuda")
    majors = {v.split(".")[0] for n, v in cuda.items() if n.startswith("nvidia-cuda-runtime")}
    assert len(majors) == 1 and "cuda-toolkit" in cuda
    suffixes = {n.rsplit("-", 1)[1] for n in cuda if n.startswith("nvidia-")}
    lines = {s for s in suffixes if s.startswith("cu") and s[2:].isdigit()}
    assert lines == {f"cu{majors.pop()}"}, lines


def test_cpu_image_is_the_gpu_image_with_cpu_torch() -> None:
    """The venv test installs server-cpu.txt: it must be the GPU image's set, torch swapped, CUDA wheels gone."""
    cuda, cpu = _pins("server-cuda"), _pins("server-cpu")
    without_cuda = {n: v for n, v in cuda.items() if not update.is_cuda_runtime(n) and n != "torch"}
    assert {n: v for n, v in cpu.items() if n != "torch"} == without_cuda


def test_dev_and_operator_agree_with_the_images() -> None:
    dev, cpu, operator = _pins("dev"), _pins("server-cpu"), _pins("operator")
    assert {n: dev.get(n) for n in cpu} == cpu
    build_backend = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["build-system"]["requires"]}
    assert {n: dev.get(n) for n in operator if n not in build_backend} == {
        n: v for n, v in operator.items() if n not in build_backend
    }
    assert "torch" not in operator and "transformers" not in operator


def test_this_environment_runs_the_lock() -> None:
    """What the tests import is what locks/dev.txt pins (CI installs it with `make install`)."""
    drift = []
    for name, version in _pins("dev").items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{name}=={version} not installed")
            continue
        if Version(installed) != Version(version):
            drift.append(f"{name}: installed {installed}, locked {version}")
    assert not drift, "the venv is not the lock (run `make install`):\n" + "\n".join(drift)
