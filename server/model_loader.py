"""Find a Hugging Face checkpoint (local dir, hub id or bucket), read its config and load its safetensors.

A local path never touches the network; `gs://bucket/prefix` and `s3://bucket/prefix` go through
the adapters' object-store layer (resumable, size-checked downloads into `$HF_HOME/loraplex-models`);
anything else goes through `huggingface_hub.snapshot_download`, which honours `HF_TOKEN`,
`HF_HUB_OFFLINE` and the hub cache.

For a bucket, `revision` is the GCS generation / S3 version id of the prefix's `config.json`: the
snapshot is cached under the version it was fetched at, and a pinned revision that is no longer
the live `config.json` is refused rather than mixed with newer files.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from loraplex.server.models import model_class

# What a model dir needs: config, weights, tokenizer and chat template (never *.bin / *.pth).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
# Buffers some older checkpoints carry that the engine recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_model_path(model_id: str, revision: str | None = None) -> Path:
    """A local directory as is (`file://` allowed); a hub id (`org/repo`, `hf://org/repo`) downloaded."""
    if model_id.startswith("file://"):
        model_id = model_id.removeprefix("file://")
        if not Path(model_id).is_dir():
            raise FileNotFoundError(f"model directory {model_id} does not exist")
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if model_id.startswith(("gs://", "s3://")):
        return download_bucket_model(model_id, revision, _model_cache_dir())
    from huggingface_hub import snapshot_download

    repo_id = model_id.removeprefix("hf://")
    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_HUB_PATTERNS))


def _model_cache_dir() -> Path:
    hf_home = os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface"
    return Path(os.environ.get("MODEL_CACHE_DIR") or Path(hf_home) / "loraplex-models")


def download_bucket_model(uri: str, revision: str | None, cache_dir: Path) -> Path:
    """Snapshot the model files of `gs://bucket/prefix` (or s3://) into `cache_dir`; resumes partial files."""
    from loraplex.server.adapters.object_store import download, open_store

    scheme, _, rest = uri.partition("://")
    bucket, _, prefix = rest.partition("/")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    store = open_store(scheme, bucket)
    config = store.stat(f"{prefix}config.json")
    if revision and config.version != revision:
        raise FileNotFoundError(
            f"{uri}: revision {revision} is not the live config.json (now {config.version}): the prefix changed"
        )
    target = _snapshot_dir(cache_dir, uri, config.version)
    if config.version and (target / ".complete").exists():
        return target  # an unversioned S3 prefix is listed again every time: nothing names its bytes
    target.mkdir(parents=True, exist_ok=True)
    wanted = [o for o in store.list(prefix) if _is_model_file(o.key[len(prefix) :])]
    for obj in wanted:
        dest = target / obj.key[len(prefix) :]
        if not (dest.exists() and dest.stat().st_size == obj.size):
            download(store, obj, dest)
    safetensors_files(target)  # refuses a prefix without weights before marking it complete
    (target / ".complete").write_text(f"{uri}@{config.version}\n")
    return target


def _snapshot_dir(cache_dir: Path, uri: str, version: str | None) -> Path:
    readable = re.sub(r"[^\w.-]+", "_", uri.partition("://")[2]).strip("_")[-80:]
    return cache_dir / f"{readable}-{hashlib.sha256(f'{uri}@{version}'.encode()).hexdigest()[:16]}"


def _is_model_file(name: str) -> bool:
    return "/" not in name and any(fnmatch.fnmatch(name, pattern) for pattern in _HUB_PATTERNS)


def load_config(path: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path)


def safetensors_files(path: Path) -> list[Path]:
    """The checkpoint's files: the shards listed in `model.safetensors.index.json`, else every *.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / shard for shard in shards]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    return files


def iter_weights(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_weights(model: nn.Module, weights: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model, routing q/k/v and gate/up into their fused layers."""
    params = dict(model.named_parameters(remove_duplicate=False))
    packed = model.packed_modules_mapping
    loaded: set[str] = set()
    fused_shards: dict[str, set[int]] = {}
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES):
            continue
        module_path, _, kind = name.rpartition(".")
        parent, _, leaf = module_path.rpartition(".")
        if leaf in packed:
            fused, shard = packed[leaf]
            target = f"{parent}.{fused}"
            layer = model.get_submodule(target)
            layer.load_base(kind, shard, tensor)
            fused_shards.setdefault(f"{target}.{kind}", set()).add(shard)
            if len(fused_shards[f"{target}.{kind}"]) == len(layer.out_features):
                loaded.add(f"{target}.{kind}")
            continue
        if name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        if params[name].shape != tensor.shape:
            raise ValueError(
                f"{name}: checkpoint shape {tuple(tensor.shape)}, model {tuple(params[name].shape)}"
            )
        params[name].data.copy_(tensor)
        loaded.add(name)
    # A tied head shares the embedding's Parameter: loading either name fills both.
    loaded_ids = {id(params[name]) for name in loaded}
    missing = [name for name, param in params.items() if id(param) not in loaded_ids]
    if missing:
        raise ValueError(f"checkpoint is missing weights: {missing[:8]}{' ...' if len(missing) > 8 else ''}")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def load_model(path: Path, config, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build the registered implementation on `device` in `dtype` and fill it from the checkpoint."""
    cls = model_class(config)
    with torch.device(device), _default_dtype(dtype):
        model = cls(config)
    load_weights(model, iter_weights(path))
    return model.eval()
