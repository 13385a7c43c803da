"""The generated fixtures are real artefacts: they load with transformers/peft and differ."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.server.demo_assets import ADAPTER_RECIPES, build_tiny_assets

PROMPT = "the adapter serves many tokens"


def _greedy(model, tokenizer, prompt: str, new_tokens: int = 12) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_adapters_change_greedy_output(tiny_assets, kind: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.models[kind])
    base = AutoModelForCausalLM.from_pretrained(tiny_assets.models[kind], dtype=torch.float32)
    outputs = {"base": _greedy(base, tokenizer, PROMPT)}
    for recipe in ADAPTER_RECIPES:
        base = AutoModelForCausalLM.from_pretrained(tiny_assets.models[kind], dtype=torch.float32)
        model = PeftModel.from_pretrained(base, tiny_assets.adapters[kind][recipe.name])
        outputs[recipe.name] = _greedy(model, tokenizer, PROMPT)
    assert len({tuple(v) for v in outputs.values()}) == len(outputs), outputs


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_adapter_files_match_recipe(tiny_assets, kind: str) -> None:
    from safetensors.torch import load_file

    for recipe in ADAPTER_RECIPES:
        adapter_dir = tiny_assets.adapters[kind][recipe.name]
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA"
        assert config["r"] == recipe.rank
        assert set(config["target_modules"]) == set(recipe.target_modules)
        tensors = load_file(adapter_dir / "adapter_model.safetensors")
        lora_b = [t for name, t in tensors.items() if "lora_B" in name]
        assert lora_b and all(t.abs().sum() > 0 for t in lora_b)
        modules = {name.split(".")[-3] for name in tensors}
        assert modules == set(recipe.target_modules)


def test_tokenizer_round_trips_and_has_chat_template(tiny_assets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    text = "Hello! The scheduler batches every prompt ü 日本"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|assistant|>\n") and "<|user|>\nhi<|end|>" in chat


def test_build_is_deterministic_and_cached(tiny_assets, tmp_path) -> None:
    again = build_tiny_assets(tmp_path)
    for kind, path in tiny_assets.models.items():
        assert (path / "model.safetensors").read_bytes() == (
            again.models[kind] / "model.safetensors"
        ).read_bytes()
    marker = again.root / ".complete"
    mtime = marker.stat().st_mtime_ns
    assert build_tiny_assets(tmp_path).root == again.root
    assert marker.stat().st_mtime_ns == mtime
