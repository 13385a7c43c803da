"""Every registered architecture against its transformers implementation (random tiny weights, float32)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)

from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_runner import ModelRunner, RunnerConfig
from loraplex.server.models import MODEL_REGISTRY, lora_module_shapes, model_class

SHAPE = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=256,
)
CONFIGS = {
    "llama-tied": LlamaConfig(**SHAPE, tie_word_embeddings=True),
    "llama-bias": LlamaConfig(**SHAPE, attention_bias=True, tie_word_embeddings=False),
    "mistral-sliding": MistralConfig(**SHAPE, sliding_window=4, tie_word_embeddings=False),
    "qwen2": Qwen2Config(**SHAPE, tie_word_embeddings=False),
    "gemma": GemmaConfig(**SHAPE),
    "gemma2": Gemma2Config(**SHAPE, sliding_window=4, query_pre_attn_scalar=12, attn_logit_softcapping=5.0),
}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _save_random_model(config, path: Path) -> torch.nn.Module:
    """Random weights everywhere, biases and norm weights included, so each of them matters."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.2)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_and_decode_match_transformers(name: str, tmp_path: Path) -> None:
    reference = _save_random_model(CONFIGS[name], tmp_path)
    runner = ModelRunner(
        RunnerConfig(model_path=str(tmp_path), block_size=4, num_kv_blocks=8, max_lora_rank=4)
    )
    ids = torch.randint(0, 97, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    table = (5, 0, 3)
    logits = runner.execute(ForwardBatch((SequenceChunk(0, tuple(ids[:7]), 0, table, None),)))
    torch.testing.assert_close(logits[0], expected[6], atol=1e-4, rtol=0)
    for pos in range(7, 12):
        logits = runner.execute(ForwardBatch((SequenceChunk(0, (ids[pos],), pos, table, None),)))
        torch.testing.assert_close(logits[0], expected[pos], atol=1e-4, rtol=0)


def test_registry_names_the_supported_architectures() -> None:
    assert set(MODEL_REGISTRY) == {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "Qwen2ForCausalLM",
        "GemmaForCausalLM",
        "Gemma2ForCausalLM",
    }
    gpt2 = GPT2Config(architectures=["GPT2LMHeadModel"])
    with pytest.raises(ValueError, match=r"unsupported architecture \['GPT2LMHeadModel'\]"):
        model_class(gpt2)


def test_lora_module_shapes() -> None:
    config = LlamaConfig(**SHAPE, architectures=["LlamaForCausalLM"])
    assert lora_module_shapes(config) == {
        "q_proj": (32, 32),
        "k_proj": (32, 16),
        "v_proj": (32, 16),
        "o_proj": (32, 32),
        "gate_proj": (32, 48),
        "up_proj": (32, 48),
        "down_proj": (48, 32),
    }
