"""RotaryEmbedding against transformers' Llama rotary embedding (default and llama3 scaling)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from loraplex.server.layers.rotary import RotaryEmbedding, apply_rotary

LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@pytest.mark.parametrize("rope", [{"rope_type": "default", "rope_theta": 10000.0}, LLAMA3])
def test_matches_transformers(rope: dict) -> None:
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_parameters=rope
    )
    positions = torch.tensor([0, 3, 7, 200, 1000])
    q, k = torch.randn(5, 4, 16), torch.randn(5, 2, 16)
    cos, sin = RotaryEmbedding(config, 16)(positions, torch.float32)
    ref_cos, ref_sin = LlamaRotaryEmbedding(config)(q, positions[None])
    torch.testing.assert_close(cos, ref_cos[0])
    want_q, want_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos, ref_sin)
    torch.testing.assert_close(apply_rotary(q, cos, sin), want_q[0].transpose(0, 1))
    torch.testing.assert_close(apply_rotary(k, cos, sin), want_k[0].transpose(0, 1))


def test_refuses_length_dependent_rope() -> None:
    config = LlamaConfig(
        hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "dynamic", "factor": 2.0}
    )
    with pytest.raises(ValueError, match="'dynamic' is not supported"):
        RotaryEmbedding(config, 16)
