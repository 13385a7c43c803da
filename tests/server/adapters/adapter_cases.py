"""Broken PEFT adapters built from a good one, each with the refusal it must get (shared by tests)."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def _copy_with_config(good: Path, out: Path, **changes: object) -> Path:
    shutil.copytree(good, out)
    config = json.loads((out / CONFIG).read_text())
    (out / CONFIG).write_text(json.dumps({**config, **changes}))
    return out


def _truncated(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    data = (out / WEIGHTS).read_bytes()
    (out / WEIGHTS).write_bytes(data[: len(data) // 2])
    return out


def _wrong_shapes(good: Path, out: Path) -> Path:
    shutil.copytree(good, out)
    tensors = load_file(str(out / WEIGHTS))
    sliced = {k: (v[:, : v.shape[1] // 2].contiguous() if "lora_A" in k else v) for k, v in tensors.items()}
    save_file(sliced, str(out / WEIGHTS))
    return out


# name -> (builder(good adapter dir, out dir), error_type, a fragment of the message)
BAD_ADAPTERS: dict[str, tuple[Callable[[Path, Path], Path], str, str]] = {
    "wrong-rank": (
        lambda g, o: _copy_with_config(g, o, r=64),
        "rank_exceeds_max",
        "exceeds the server's max LoRA rank",
    ),
    "unknown-module": (
        lambda g, o: _copy_with_config(g, o, target_modules=["q_proj", "lm_head"]),
        "unknown_target_module",
        "lm_head",
    ),
    "truncated": (_truncated, "corrupt_file", "unreadable safetensors"),
    "wrong-shapes": (_wrong_shapes, "shape_mismatch", "do not fit the base"),
    "dora": (lambda g, o: _copy_with_config(g, o, use_dora=True), "unsupported", "DoRA"),
}


def traversal_tarball(good: Path) -> bytes:
    """A gzip tarball with the adapter's files and one member that escapes the extraction dir."""
    buffer = io.BytesIO()
    members = {name: (good / name).read_bytes() for name in (CONFIG, WEIGHTS)} | {"../../evil.txt": b"x"}
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def hub_cache(root: Path, repo: str, adapter: Path, commit: str = "b" * 40) -> None:
    """`adapter` laid out as the Hugging Face hub cache holds `repo` at `main`."""
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(adapter, repo_dir / "snapshots" / commit)
