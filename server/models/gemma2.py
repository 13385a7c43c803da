"""Gemma and Gemma2: (1 + w) RMSNorm, embeddings scaled by sqrt(hidden), tanh-GELU MLP, tied head.

Gemma2 adds norms after attention and around the MLP, attention-logit and final-logit
softcapping, `query_pre_attn_scalar` and a sliding window on alternate layers.
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.server.layers.metadata import ForwardMetadata
from loraplex.server.layers.norm import RMSNorm
from loraplex.server.models.llama import MLP, Attention, LayerKVCache, LlamaForCausalLM, Rope


class Gemma2DecoderLayer(nn.Module):
    """Sandwich norms: x + norm(attn(norm(x))), then + norm(mlp(norm(.))).

    As in `LlamaDecoderLayer` the stream is hidden + residual; the post-norms normalise the
    attention / MLP output alone, the pre-norms add it to the stream in the same op.
    """

    def __init__(self, config, attention: Attention) -> None:
        super().__init__()
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = attention
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset=1.0)
        self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset=1.0)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        kv_cache: LayerKVCache,
        meta: ForwardMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        backend = meta.lora_backend
        normed, residual = self.input_layernorm.add_forward(hidden, residual, backend)
        attn, _ = self.post_attention_layernorm.add_forward(
            self.self_attn(normed, rope, kv_cache, meta), None, backend
        )
        normed, residual = self.pre_feedforward_layernorm.add_forward(attn, residual, backend)
        mlp, _ = self.post_feedforward_layernorm.add_forward(self.mlp(normed, meta), None, backend)
        return mlp, residual


class GemmaForCausalLM(LlamaForCausalLM):
    norm_offset = 1.0

    def embed_scale(self) -> float | None:
        return self.config.hidden_size**0.5


class Gemma2ForCausalLM(GemmaForCausalLM):
    def __init__(self, config) -> None:
        super().__init__(config)
        self.final_logit_softcap = config.final_logit_softcapping

    def make_layer(self, layer_index: int) -> nn.Module:
        bias = bool(getattr(self.config, "attention_bias", False))
        attention = Attention(
            self.config,
            layer_index,
            qkv_bias=bias,
            o_bias=bias,
            scale=self.config.query_pre_attn_scalar**-0.5,
            softcap=self.config.attn_logit_softcapping,
        )
        return Gemma2DecoderLayer(self.config, attention)
