"""The server image's exact requirement set works: a fresh venv gets `locks/server-cpu.txt` (the
GPU image's set with CPU torch, tests/test_locks.py), the package built like the Dockerfile builds
it, then `loraplex serve --demo` answers and the server test tier passes on it.

Slow (minutes: a torch install), and it still runs in CI (`make test` deselects only `gpu`).
The test tools come from `dev.txt` on top, never changing a version the image pins.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LOCKS = REPO / "locks"
pytestmark = pytest.mark.slow


def _pins(lock: Path) -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#") and "==" in line:
            name, _, rest = line.partition("==")
            pins[name.strip().lower()] = rest.split()[0]
    return pins


def _run(*args: str, cwd: Path = REPO, timeout: float = 1800, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        args, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )
    assert result.returncode == 0, f"{' '.join(args)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout


def _test_tools_lock(tmp: Path) -> Path:
    """The dev.txt entries the image lacks (pytest, the storage emulators, ...), hashes and all."""
    image = _pins(LOCKS / "server-cpu.txt")
    blocks, keep = [], False
    for line in (LOCKS / "dev.txt").read_text().splitlines():
        if line and not line[0].isspace() and not line.startswith("#"):
            keep = line.split("==")[0].strip().lower() not in image
        if keep and line.strip() and not line.lstrip().startswith("#"):
            blocks.append(line)
    path = tmp / "test-tools.txt"
    path.write_text("\n".join(blocks) + "\n")
    return path


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("image-venv")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", str(venv))
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--require-hashes", "--no-deps"]
    _run(*pip, "-r", str(LOCKS / "server-cpu.txt"))  # what images/server-cpu.Dockerfile installs
    _run(*pip[:-2], "--no-deps", "--no-build-isolation", str(REPO))  # the package, not editable
    _run(str(venv / "bin" / "python"), "-m", "pip", "check")
    installed = json.loads(_run(str(venv / "bin" / "python"), "-m", "pip", "list", "--format", "json"))
    versions = {item["name"].lower().replace("_", "-"): item["version"] for item in installed}
    for name, version in _pins(LOCKS / "server-cpu.txt").items():
        assert versions.get(name) == version, f"{name}: venv has {versions.get(name)}, lock pins {version}"
    _run(*pip, "-r", str(_test_tools_lock(tmp)))
    return venv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read()
    except OSError:
        return 0, b""


def test_demo_serves_from_the_image_set(image_venv: Path, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "LORAPLEX_DEMO_DIR": str(tmp_path / "demo"), "HOSTNAME": "127.0.0.1"}
    cli = str(image_venv / "bin" / "loraplex")
    server = subprocess.Popen(
        [cli, "serve", "--demo", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 300
        while _get(f"http://127.0.0.1:{port}/ready")[0] != 200:
            assert server.poll() is None, server.stdout.read().decode()[-4000:]
            assert time.monotonic() < deadline, "loraplex serve --demo never became ready"
            time.sleep(1)
        body = json.dumps({"inputs": "the model", "parameters": {"max_new_tokens": 4}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/generate", data=body, headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200 and "generated_text" in json.loads(response.read())
        status, models = _get(f"http://127.0.0.1:{port}/v1/models")
        assert status == 200 and len(json.loads(models)["data"]) >= 2  # the base and its demo adapters
    finally:
        server.terminate()
        server.wait(timeout=60)


def test_server_tier_passes_on_the_image_set(image_venv: Path, tmp_path: Path) -> None:
    where = _run(
        str(image_venv / "bin" / "python"),
        "-c",
        "import loraplex.server; print(*loraplex.server.__path__)",
        cwd=tmp_path,
    )
    assert str(image_venv) in where, where  # the installed package, not the checkout
    args = [
        str(image_venv / "bin" / "pytest"),
        "-q",
        "-x",
        "-p",
        "no:cacheprovider",
        "-m",
        "not gpu",
        "tests/server",
    ]
    out = _run(*args, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=3000)
    assert " passed" in out and " failed" not in out, out[-2000:]
