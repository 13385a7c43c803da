"""Finding checkpoints and loading their weights (sharded too) into the engine's fused layout."""

from __future__ import annotations

import json
from pathlib import Path

import huggingface_hub
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from loraplex.server.demo_assets import TinyAssets
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_loader import load_config, load_model, resolve_model_path, safetensors_files
from loraplex.server.model_runner import ModelRunner, RunnerConfig

CPU = torch.device("cpu")


def _logits(model_dir: Path) -> torch.Tensor:
    runner = ModelRunner(RunnerConfig(model_path=str(model_dir), num_kv_blocks=4, max_lora_rank=4))
    return runner.execute(ForwardBatch((SequenceChunk(0, (5, 9, 2, 7), 0, (1,), None),)))


def test_sharded_checkpoint_loads(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_assets.models["gemma2"], dtype=torch.float32)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert len(safetensors_files(tmp_path)) > 1
    assert torch.equal(_logits(tmp_path), _logits(tiny_assets.models["gemma2"]))


def test_local_paths_never_touch_the_hub(tiny_assets: TinyAssets, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_network(*args, **kwargs):
        raise AssertionError("snapshot_download called for a local path")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    local = tiny_assets.models["llama"]
    assert resolve_model_path(str(local)) == local
    assert resolve_model_path(f"file://{local}") == local
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("file:///no/such/model")


def test_hub_ids_go_through_snapshot_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("hf://google/gemma-2-2b-it", revision="abc") == tmp_path
    assert resolve_model_path("google/gemma-2-2b-it") == tmp_path
    assert [c[:2] for c in calls] == [("google/gemma-2-2b-it", "abc"), ("google/gemma-2-2b-it", None)]
    assert "*.safetensors" in calls[0][2] and "*.bin" not in calls[0][2]


def _rewrite_weights(src: Path, dst: Path, change) -> Path:
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(src / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"), r"missing weights: \['model.layers.1"),
        (lambda t: t.pop("model.norm.weight"), r"missing weights: \['model.norm.weight'\]"),
        (lambda t: t.update({"model.layers.0.extra.weight": torch.zeros(2)}), "has no place"),
        (lambda t: t.update({"model.norm.weight": torch.zeros(3)}), "checkpoint shape"),
        (lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(3, 3)}), "slice 1"),
    ],
)
def test_bad_checkpoints_are_refused(tiny_assets: TinyAssets, tmp_path: Path, change, message: str) -> None:
    src = tiny_assets.models["llama"]
    path = _rewrite_weights(src, tmp_path / "model", change)
    with pytest.raises(ValueError, match=message):
        load_model(path, load_config(path), torch.float32, CPU)


def test_missing_weights_file(tiny_assets: TinyAssets, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((tiny_assets.models["llama"] / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors"):
        load_model(tmp_path, load_config(tmp_path), torch.float32, CPU)


def test_loads_in_half_precision(tiny_assets: TinyAssets) -> None:
    path = tiny_assets.models["llama"]
    model = load_model(path, load_config(path), torch.bfloat16, CPU)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored after construction
