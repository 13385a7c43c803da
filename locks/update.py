"""Regenerate the lock files from pyproject.toml with `uv pip compile` (`make lock`).

One resolution, five requirement sets (Linux x86_64, CPython 3.11, every line hash-pinned):

- `server-cuda.txt`  the GPU image: PyPI torch with its CUDA runtime wheels and the Triton it pins.
- `server-cpu.txt`   the CPU image: the same set with the CPU wheel of torch (no CUDA wheels).
- `dev.txt`          CI and `make install`: the test tools on top, CPU torch.
- `dev-cuda.txt`     `make install LOCK=locks/dev-cuda.txt` on a GPU machine.
- `operator.txt`     the operator image: the `operator` extra only (no torch).

`server-cuda.txt` is resolved first and every other set is constrained to its versions, so
torch, Triton and transformers are the same everywhere; tests/test_locks.py checks it. The
`[tool.loraplex.lock] no-deps` packages are appended to the dev sets, hash-pinned, without
their dependencies (every install from a lock is `--no-deps`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
TORCH_VERSION = "2.13.0"
TORCH_CPU = f"torch=={TORCH_VERSION}+cpu"
TORCH_CUDA = f"torch=={TORCH_VERSION}"
PLATFORM = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]
PYPI = "the default index"
# Where the CPU wheel of torch is found when locking: the find-links folder of the dev machines
# (download.pytorch.org/whl/cpu, where the CPU image installs it from, is not reachable there).
CPU_TORCH_SOURCES = ["--find-links", "/opt/wheels"]

# name -> (pyproject extras or None for the operator set, torch pin, constrained by)
TARGETS: dict[str, tuple[tuple[str, ...] | None, str | None, str | None]] = {
    "server-cuda": (("gcs", "s3"), TORCH_CUDA, None),
    "server-cpu": (("gcs", "s3"), TORCH_CPU, "server-cuda"),
    "dev": (("test", "gcs", "s3"), TORCH_CPU, "server-cuda"),
    "dev-cuda": (("test", "gcs", "s3"), TORCH_CUDA, "server-cuda"),
    "operator": (None, None, "dev"),
}


def pins(lock: Path) -> dict[str, str]:
    """`name -> version` of every `name==version` line of a lock file."""
    found = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, _, rest = line.partition("==")
            found[normalise(name)] = rest.split()[0].rstrip("\\").strip()
    return found


def normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-").split("[")[0]


def no_deps_requirements() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject.get("tool", {}).get("loraplex", {}).get("lock", {}).get("no-deps", [])


def operator_requirements() -> list[str]:
    """The `operator` extra plus the build backend (the image builds the wheel without isolation)."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["optional-dependencies"]["operator"] + pyproject["build-system"]["requires"]


def compile_target(name: str, uv: str, work: Path) -> None:
    extras, torch, constrained_by = TARGETS[name]
    cmd = [uv, "pip", "compile", *PLATFORM, "--generate-hashes", "--no-header", "--quiet"]
    cmd += ["--index-url", PYPI, "--no-emit-package", "loraplex", "-o", str(LOCKS / f"{name}.txt")]
    if extras is None:
        requirements = work / "operator.in"
        requirements.write_text("\n".join(operator_requirements()) + "\n")
        cmd.append(str(requirements))
    else:
        cmd.append(str(REPO / "pyproject.toml"))
        cmd += [arg for extra in extras for arg in ("--extra", extra)]
    if torch:
        override = work / f"{name}.override"
        override.write_text(torch + "\n")
        cmd += ["--override", str(override)]
    if torch == TORCH_CPU:
        cmd += [*CPU_TORCH_SOURCES, "--index-strategy", "unsafe-best-match"]
    if constrained_by:
        constraints = work / f"{name}.constraints"
        skip = {"torch"} | ({p for p in pins(LOCKS / f"{constrained_by}.txt") if is_cuda_runtime(p)})
        lines = [f"{p}=={v}" for p, v in pins(LOCKS / f"{constrained_by}.txt").items() if p not in skip]
        constraints.write_text("\n".join(lines) + "\n")
        cmd += ["--constraint", str(constraints)]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    if extras and "test" in extras and no_deps_requirements():
        _append_no_deps(uv, LOCKS / f"{name}.txt", work)
    _finish(LOCKS / f"{name}.txt", name, work)


def _append_no_deps(uv: str, lock: Path, work: Path) -> None:
    requirements = work / "no-deps.in"
    requirements.write_text("\n".join(no_deps_requirements()) + "\n")
    out = work / "no-deps.txt"
    cmd = [uv, "pip", "compile", *PLATFORM, "--generate-hashes", "--no-header", "--quiet", "--no-deps"]
    subprocess.run([*cmd, "--index-url", PYPI, "-o", str(out), str(requirements)], check=True, cwd=REPO)
    lock.write_text(
        lock.read_text()
        + "# installed without its dependencies ([tool.loraplex.lock] no-deps):\n"
        + out.read_text()
    )


def is_cuda_runtime(name: str) -> bool:
    """The wheels the CUDA build of torch brings and the CPU build does not."""
    return name.startswith(("nvidia-", "cuda-"))


def _finish(lock: Path, name: str, work: Path) -> None:
    """A header, and the temporary inputs' paths named stably so reruns give the same bytes."""
    body = lock.read_text().replace(f"{work}/", "locks/update.py:")
    lock.write_text(
        f"# {name}: generated by `make lock` (locks/update.py) from pyproject.toml; do not edit.\n{body}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("targets", nargs="*", help=f"some of {', '.join(TARGETS)} (default: all, in order)")
    args = parser.parse_args()
    unknown = set(args.targets) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets {sorted(unknown)}")
    uv = str(Path(sys.executable).with_name("uv"))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.targets or TARGETS:
            compile_target(name, uv, Path(tmp))
    return 0


if __name__ == "__main__":
    sys.exit(main())
