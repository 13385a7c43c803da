"""Architectures the engine implements, keyed by the `architectures` entry of a Hugging Face config."""

from __future__ import annotations

from loraplex.server.models.gemma2 import Gemma2ForCausalLM, GemmaForCausalLM
from loraplex.server.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, head_dim_of

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
}


def model_class(config) -> type[LlamaForCausalLM]:
    """The implementation for a config, or ValueError naming what is supported."""
    for arch in getattr(config, "architectures", None) or ():
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported architecture {getattr(config, 'architectures', None)}; supported: {sorted(MODEL_REGISTRY)}"
    )


def lora_module_shapes(config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every projection a LoRA may target in this architecture."""
    model_class(config)
    hidden, inter = config.hidden_size, config.intermediate_size
    q_size = config.num_attention_heads * head_dim_of(config)
    kv_size = config.num_key_value_heads * head_dim_of(config)
    return {
        "q_proj": (hidden, q_size),
        "k_proj": (hidden, kv_size),
        "v_proj": (hidden, kv_size),
        "o_proj": (q_size, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


__all__ = ["MODEL_REGISTRY", "lora_module_shapes", "model_class"]
