"""Base models from gs:// and s3:// (sharded safetensors + tokenizer) against the real storage servers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.object_store import StoredObject, download, open_store
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_loader import _snapshot_dir, resolve_model_path, safetensors_files
from loraplex.server.model_runner import ModelRunner, RunnerConfig


@pytest.fixture(scope="module")
def sharded_model(tiny_assets, tmp_path_factory) -> Path:
    """The tiny Gemma2 saved in several shards, with its tokenizer and chat template."""
    out = tmp_path_factory.mktemp("sharded")
    source = tiny_assets.models["gemma2"]
    AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).save_pretrained(
        out, max_shard_size="100KB"
    )
    for path in source.iterdir():
        if path.is_file() and not path.name.endswith(".safetensors") and not (out / path.name).exists():
            shutil.copy(path, out / path.name)
    assert len(safetensors_files(out)) > 1
    return out


def _logits(model: str, revision: str | None = None) -> torch.Tensor:
    config = RunnerConfig(model_path=model, revision=revision, num_kv_blocks=4, max_lora_rank=4)
    return ModelRunner(config).execute(ForwardBatch((SequenceChunk(0, (5, 9, 2, 7), 0, (1,), None),)))


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.mark.slow
def test_gs_model_loads_like_the_local_one(
    gcs_bucket, gcs_upload, sharded_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    generations = gcs_upload(gcs_bucket, sharded_model, "models/tiny-gemma2")
    gcs_bucket.blob("models/tiny-gemma2/extra/nested.safetensors").upload_from_string(
        b"not part of the model"
    )
    uri = f"gs://{gcs_bucket.name}/models/tiny-gemma2"
    snapshot = resolve_model_path(uri)
    assert _files(snapshot) == _files(sharded_model)
    assert torch.equal(_logits(uri), _logits(str(sharded_model)))

    pinned = str(generations["models/tiny-gemma2/config.json"])
    assert resolve_model_path(uri, revision=pinned) == snapshot
    with pytest.raises(FileNotFoundError, match="revision"):
        resolve_model_path(uri, revision="1")


@pytest.mark.slow
def test_s3_model_revision_and_resume(
    s3_env, s3_bucket, s3_upload, sharded_model, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path / "cache"))
    versions = s3_upload(s3_bucket, sharded_model, "m")
    uri = f"s3://{s3_bucket}/m"
    # An earlier attempt died half-way through the first shard: the next one resumes it.
    shard = safetensors_files(sharded_model)[0]
    target = _snapshot_dir(tmp_path / "cache", uri, versions["m/config.json"])
    target.mkdir(parents=True)
    (target / f"{shard.name}.partial").write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    snapshot = resolve_model_path(uri, revision=versions["m/config.json"])
    assert snapshot == target and _files(snapshot) == _files(sharded_model)
    assert torch.equal(_logits(uri), _logits(str(sharded_model)))

    s3_env.client().put_object(
        Bucket=s3_bucket, Key="m/config.json", Body=(sharded_model / "config.json").read_bytes()
    )
    with pytest.raises(FileNotFoundError, match="revision"):
        resolve_model_path(uri, revision=versions["m/config.json"])  # the prefix moved on: refused, not mixed


def test_missing_model_prefix_is_typed(gcs_bucket, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("MODEL_CACHE_DIR", str(tmp_path))
    with pytest.raises(SourceError) as info:
        resolve_model_path(f"gs://{gcs_bucket.name}/no/model")
    assert info.value.error_type == "adapter_not_found"


def test_download_checks_the_size(gcs_bucket, tmp_path) -> None:
    gcs_bucket.blob("blob").upload_from_string(b"0123456789")
    store = open_store("gs", gcs_bucket.name)
    listed = store.stat("blob")
    assert download(store, listed, tmp_path / "ok").read_bytes() == b"0123456789"
    with pytest.raises(SourceError) as info:
        download(store, StoredObject("blob", listed.size + 5, listed.version), tmp_path / "short")
    assert info.value.error_type == "integrity" and not (tmp_path / "short.partial").exists()
