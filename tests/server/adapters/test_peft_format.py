"""Reading PEFT LoRA adapters: scaling folded like peft does it, and clear refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex.server.adapters.peft_format import AdapterValidationError, load_peft_adapter
from loraplex.server.demo_assets import TinyAssets


@pytest.fixture(scope="module")
def llama(tiny_assets: TinyAssets):
    return AutoConfig.from_pretrained(tiny_assets.models["llama"])


def _copy(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    config_path = dst / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(config_changes)
    config_path.write_text(json.dumps(config))
    return dst


def _peft_scaled_b(model, layer: int, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scaling) as peft computes them for one projection."""
    parent = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    lora = model.get_submodule(f"base_model.model.model.layers.{layer}.{parent}.{module}")
    return lora.lora_A["default"].weight, lora.lora_B["default"].weight * lora.scaling["default"]


@pytest.mark.parametrize("name", ["a4", "b8", "c16"])
def test_demo_adapters_fold_scaling_like_peft(tiny_assets: TinyAssets, llama, name: str) -> None:
    from peft import PeftModel

    adapter_dir = tiny_assets.adapters["llama"][name]
    weights = load_peft_adapter(adapter_dir, name, llama, max_rank=16)
    base = AutoModelForCausalLM.from_pretrained(tiny_assets.models["llama"], dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert weights.name == name
    assert weights.rank == config["r"]
    assert set(weights.target_modules) == set(config["target_modules"])
    assert weights.base_model_name_or_path == "tiny-llama"
    assert len(weights.tensors) == llama.num_hidden_layers * len(config["target_modules"])
    for (layer, module), (a, b) in weights.tensors.items():
        want_a, want_b = _peft_scaled_b(reference, layer, module)
        torch.testing.assert_close(a, want_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(b, want_b, atol=1e-6, rtol=0)


def test_rank_and_alpha_patterns(tiny_assets: TinyAssets, llama, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_assets.models["llama"], dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"layers.1.self_attn.q_proj": 5},
    )
    model = get_peft_model(base, config)
    with torch.no_grad():
        for param_name, param in model.named_parameters():
            if "lora_" in param_name:
                param.normal_()
    model.save_pretrained(tmp_path)
    weights = load_peft_adapter(tmp_path, "patterns", llama, max_rank=8)
    assert weights.rank == 8
    assert weights.tensors[(0, "down_proj")][0].shape == (2, llama.intermediate_size)
    assert model.get_submodule("base_model.model.model.layers.1.self_attn.q_proj").scaling["default"] == 5 / 8
    for (layer, module), (a, b) in weights.tensors.items():
        want_a, want_b = _peft_scaled_b(model, layer, module)
        torch.testing.assert_close(a, want_a, atol=1e-6, rtol=0)
        torch.testing.assert_close(b, want_b, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"peft_type": "IA3"}, "only LoRA adapters"),
        ({"target_modules": ["q_proj", "lm_head"]}, r"\['lm_head'\] are not LoRA-capable"),
        ({"target_modules": ["v_proj"]}, "targets q_proj, which target_modules does not list"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "all"}, "biases"),
        ({"r": 32}, "exceeds the server's max LoRA rank 16"),
    ],
)
def test_refuses_bad_configs(tiny_assets: TinyAssets, llama, tmp_path: Path, changes, message) -> None:
    adapter = _copy(tiny_assets.adapters["llama"]["a4"], tmp_path / "adapter", **changes)
    with pytest.raises(AdapterValidationError, match=message):
        load_peft_adapter(adapter, "bad", llama, max_rank=16)


def test_refuses_rank_above_max(tiny_assets: TinyAssets, llama) -> None:
    with pytest.raises(AdapterValidationError, match="rank r=16 exceeds the server's max LoRA rank 8"):
        load_peft_adapter(tiny_assets.adapters["llama"]["c16"], "c16", llama, max_rank=8)


def test_refuses_adapter_for_another_model(tiny_assets: TinyAssets, llama) -> None:
    other = AutoConfig.from_pretrained(tiny_assets.models["llama"], hidden_size=96)
    with pytest.raises(AdapterValidationError, match="do not fit the base"):
        load_peft_adapter(tiny_assets.adapters["llama"]["b8"], "b8", other, max_rank=16)
    fewer_layers = AutoConfig.from_pretrained(tiny_assets.models["llama"], num_hidden_layers=1)
    with pytest.raises(AdapterValidationError, match="layer 1, the base model has 1"):
        load_peft_adapter(tiny_assets.adapters["llama"]["b8"], "b8", fewer_layers, max_rank=16)


def test_refuses_unsupported_architecture(tiny_assets: TinyAssets) -> None:
    gpt2 = AutoConfig.for_model("gpt2")
    with pytest.raises(AdapterValidationError, match="unsupported architecture"):
        load_peft_adapter(tiny_assets.adapters["llama"]["a4"], "a4", gpt2, max_rank=16)


def test_refuses_missing_or_broken_files(tiny_assets: TinyAssets, llama, tmp_path: Path) -> None:
    with pytest.raises(AdapterValidationError, match=r"no adapter_config\.json"):
        load_peft_adapter(tmp_path, "empty", llama, max_rank=16)
    adapter = _copy(tiny_assets.adapters["llama"]["a4"], tmp_path / "no-weights")
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterValidationError, match=r"no adapter_model\.safetensors"):
        load_peft_adapter(adapter, "bad", llama, max_rank=16)
    adapter = _copy(tiny_assets.adapters["llama"]["a4"], tmp_path / "corrupt")
    (adapter / "adapter_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(AdapterValidationError, match="unreadable safetensors"):
        load_peft_adapter(adapter, "bad", llama, max_rank=16)
    (adapter / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterValidationError, match="invalid JSON"):
        load_peft_adapter(adapter, "bad", llama, max_rank=16)


def test_refuses_incomplete_or_foreign_tensors(tiny_assets: TinyAssets, llama, tmp_path: Path) -> None:
    source = tiny_assets.adapters["llama"]["a4"]
    tensors = load_file(source / "adapter_model.safetensors")
    half = _copy(source, tmp_path / "half")
    save_file({k: v for k, v in tensors.items() if "lora_B" not in k}, half / "adapter_model.safetensors")
    with pytest.raises(AdapterValidationError, match="lora_A and lora_B must both be present"):
        load_peft_adapter(half, "bad", llama, max_rank=16)
    foreign = _copy(source, tmp_path / "foreign")
    extra = {**tensors, "base_model.model.model.embed_tokens.lora_embedding_A": torch.zeros(4, 8)}
    save_file(extra, foreign / "adapter_model.safetensors")
    with pytest.raises(AdapterValidationError, match="unexpected tensor"):
        load_peft_adapter(foreign, "bad", llama, max_rank=16)
