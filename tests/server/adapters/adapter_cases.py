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


def _poisoned(value: float, side: str) -> Callable[[Path, Path], Path]:
    def build(good: Path, out: Path) -> Path:
        shutil.copytree(good, out)
        tensors = load_file(str(out / WEIGHTS))
        name = next(k for k in sorted(tensors) if f"lora_{side}" in k)
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[3] = value
        save_file(tensors, str(out / WEIGHTS))
        return out

    return build


def _raw_config(text: str) -> Callable[[Path, Path], Path]:
    def build(good: Path, out: Path) -> Path:
        shutil.copytree(good, out)
        (out / CONFIG).write_text(text)
        return out

    return build


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
    # issue 15: weights that would poison every batch, and configs that used to be a 500
    "nan-in-b": (_poisoned(float("nan"), "B"), "corrupt_file", "NaN or inf"),
    "inf-in-a": (_poisoned(float("inf"), "A"), "corrupt_file", "NaN or inf"),
    "alpha-overflows": (lambda g, o: _copy_with_config(g, o, lora_alpha=1e308), "corrupt_file", "NaN or inf"),
    "config-is-a-list": (_raw_config("[]"), "validation", "expected a JSON object"),
    "config-not-json": (_raw_config("{peft_type: LORA"), "validation", "invalid JSON"),
    "target-modules-int": (
        lambda g, o: _copy_with_config(g, o, target_modules=5),
        "validation",
        "target_modules",
    ),
    "alpha-is-text": (lambda g, o: _copy_with_config(g, o, lora_alpha="abc"), "validation", "lora_alpha"),
    "bad-regex": (
        lambda g, o: _copy_with_config(g, o, target_modules="(q_proj"),
        "validation",
        "regular expression",
    ),
    "rank-pattern-text": (
        lambda g, o: _copy_with_config(g, o, rank_pattern={"q_proj": "x"}),
        "validation",
        "rank_pattern",
    ),
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
