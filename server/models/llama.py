"""Llama-family decoder (Llama, Mistral, Qwen2) over the paged KV cache, with batched multi-LoRA.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn...`) so weights
load by name; q/k/v and gate/up are fused (see `PACKED_MODULES`). The forward pass takes
everything it needs as arguments: token ids, positions, the per-layer caches and the step's
`ForwardMetadata`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.kernels.fused import act_mul, rope_kv_write
from loraplex.server.layers.attention import PagedAttention
from loraplex.server.layers.linear import LoraLinear
from loraplex.server.layers.metadata import ForwardMetadata
from loraplex.server.layers.norm import RMSNorm
from loraplex.server.layers.rotary import RotaryEmbedding, apply_rotary

LayerKVCache = tuple[torch.Tensor, torch.Tensor]
Rope = tuple[torch.Tensor, torch.Tensor] | None  # the step's (cos, sin) on the reference path, None on triton

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}
# config activation -> the name `loraplex.kernels.fused.act_mul` knows (the same functions)
FUSED_ACTIVATIONS: dict[str, str] = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}

# checkpoint projection -> (fused module, slice); the same names index LoRA targets.
PACKED_MODULES: dict[str, tuple[str, int]] = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
LORA_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def sliding_window_of(config, layer_index: int) -> int | None:
    """Per-layer window: `layer_types` where the config has them (Gemma2, Qwen2), else all layers (Mistral)."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer_index] == "sliding_attention" else None
    return window


def activation_of(config) -> str:
    """The `act_mul` name of the config's MLP activation."""
    name = getattr(config, "hidden_activation", None) or config.hidden_act
    if name not in FUSED_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported (known: {sorted(FUSED_ACTIVATIONS)})")
    return FUSED_ACTIVATIONS[name]


class Attention(nn.Module):
    def __init__(
        self,
        config,
        layer_index: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        scale: float | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = LoraLinear(config.hidden_size, (q_size, kv_size, kv_size), bias=qkv_bias)
        self.o_proj = LoraLinear(q_size, (config.hidden_size,), bias=o_bias)
        self.rotary: RotaryEmbedding | None = None  # the model's, set by DecoderModel (inv_freq, scaling)
        self.attn = PagedAttention(
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            scale=self.head_dim**-0.5 if scale is None else scale,
            sliding_window=sliding_window_of(config, layer_index),
            softcap=softcap,
        )

    def forward(
        self, x: torch.Tensor, rope: Rope, kv_cache: LayerKVCache, meta: ForwardMetadata
    ) -> torch.Tensor:
        num_tokens, backend = x.shape[0], meta.lora_backend
        qkv = self.qkv_proj(x, meta.lora, backend, meta.lora_workspace)
        q, k, v = qkv.split(self.qkv_proj.out_features, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if rope is not None:  # the reference path: the step's cos/sin, q and k rotated together
            qk = qkv[:, : -self.qkv_proj.out_features[2]].view(num_tokens, -1, self.head_dim)
            q, k = apply_rotary(qk, *rope).split((self.num_heads, self.num_kv_heads), dim=1)
            out = self.attn(q, k, v, kv_cache, meta)
        else:  # one kernel: rotate q and k, write k and v to the cache
            rotary = self.rotary
            q, _ = rope_kv_write(
                q,
                k,
                v,
                meta.positions,
                rotary.inv_freq,
                rotary.scaling,
                *kv_cache,
                meta.slot_mapping,
                backend,
            )
            out = self.attn(q, None, None, kv_cache, meta)
        return self.o_proj(out, meta.lora, backend, meta.lora_workspace)


class MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = LoraLinear(config.hidden_size, (inter, inter))
        self.down_proj = LoraLinear(inter, (config.hidden_size,))
        self.act = activation_of(config)

    def forward(self, x: torch.Tensor, meta: ForwardMetadata) -> torch.Tensor:
        backend = meta.lora_backend
        hidden = act_mul(self.gate_up_proj(x, meta.lora, backend, meta.lora_workspace), self.act, backend)
        return self.down_proj(hidden, meta.lora, backend, meta.lora_workspace)


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(.)).

    Layers pass (hidden, residual) on, the stream being hidden + residual: each norm adds the
    two in the same fused op (`RMSNorm.add_forward`), so no layer launches an add of its own.
    """

    def __init__(self, config, layer_index: int, attention: Attention, norm_offset: float = 0.0) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_offset)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_offset)

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
        attn = self.self_attn(normed, rope, kv_cache, meta)
        normed, residual = self.post_attention_layernorm.add_forward(attn, residual, backend)
        return self.mlp(normed, meta), residual


class DecoderModel(nn.Module):
    """Embedding, decoder layers, final norm: the `model.` prefix of the checkpoints."""

    def __init__(
        self, config, layers: Sequence[nn.Module], norm_offset: float, embed_scale: float | None
    ) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, norm_offset)
        self.rotary = RotaryEmbedding(config, head_dim_of(config))
        self.embed_scale = embed_scale
        for layer in self.layers:
            layer.self_attn.rotary = self.rotary

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[LayerKVCache],
        meta: ForwardMetadata,
    ) -> torch.Tensor:
        """input_ids, positions [T] -> hidden states [T, hidden]."""
        if meta.lora_workspace is not None:
            meta.lora_workspace.zero_()  # one fill per step for every layer's LoRA shrink
        hidden = self.embed_tokens(input_ids)
        if self.embed_scale is not None:
            hidden = hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)
        # triton: RoPE is fused into each layer's KV write; reference: cos/sin once per step
        rope = None if meta.lora_backend == "triton" else self.rotary(positions, hidden.dtype)
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(hidden, residual, rope, kv_cache, meta)
        return self.norm.add_forward(hidden, residual, meta.lora_backend)[0]


class LlamaForCausalLM(nn.Module):
    """Llama and Mistral (Mistral's sliding window comes from its config)."""

    packed_modules_mapping = PACKED_MODULES
    lora_targets = LORA_TARGETS
    norm_offset = 0.0

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        layers = [self.make_layer(i) for i in range(config.num_hidden_layers)]
        self.model = DecoderModel(config, layers, self.norm_offset, self.embed_scale())
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcap: float | None = None

    def make_layer(self, layer_index: int) -> nn.Module:
        bias = bool(getattr(self.config, "attention_bias", False))
        attention = Attention(self.config, layer_index, qkv_bias=bias, o_bias=bias)
        return LlamaDecoderLayer(self.config, layer_index, attention, self.norm_offset)

    def embed_scale(self) -> float | None:
        return None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: Sequence[LayerKVCache],
        meta: ForwardMetadata,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, hidden] -> float32 logits [N, vocab], softcapped where the model says so."""
        logits = self.lm_head(hidden).float()
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits

    @property
    def attention_windows(self) -> frozenset[int | None]:
        return frozenset(layer.self_attn.attn.sliding_window for layer in self.model.layers)

    def lora_target(self, layer_index: int, module: str) -> tuple[LoraLinear, int]:
        """The fused layer and slice that hold the LoRA of checkpoint projection `module`."""
        path, shard = self.lora_targets[module]
        return self.model.layers[layer_index].get_submodule(path), shard

    def lora_layers(self) -> list[LoraLinear]:
        return [m for m in self.modules() if isinstance(m, LoraLinear)]


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2: biases on q, k and v, none on o."""

    def make_layer(self, layer_index: int) -> nn.Module:
        attention = Attention(self.config, layer_index, qkv_bias=True, o_bias=False)
        return LlamaDecoderLayer(self.config, layer_index, attention, self.norm_offset)
