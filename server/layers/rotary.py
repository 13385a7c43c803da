"""Rotary position embeddings (RoPE), with the scaled variants transformers knows (llama3, yarn, linear)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# These rescale with the current sequence length at run time, which a paged engine can't replay.
_UNSUPPORTED_ROPE_TYPES = frozenset({"dynamic", "longrope"})


def rope_parameters(config) -> dict:
    """The config's RoPE settings (transformers >= 5 `rope_parameters`, older `rope_theta`/`rope_scaling`)."""
    params = getattr(config, "rope_parameters", None)
    if params:
        return dict(params)
    params = dict(getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    return params


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed per step from positions, as transformers does (float32, `rotate_half`)."""

    def __init__(self, config, head_dim: int) -> None:
        super().__init__()
        params = rope_parameters(config)
        rope_type = params.get("rope_type", "default")
        if rope_type in _UNSUPPORTED_ROPE_TYPES:
            raise ValueError(f"RoPE type {rope_type!r} is not supported")
        if rope_type == "default":
            exponents = torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim
            inv_freq, scaling = 1.0 / (params["rope_theta"] ** exponents), 1.0
        else:
            inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
        # Built on the CPU (as transformers does), kept on the device the model is being built on.
        self.register_buffer("inv_freq", inv_freq.float().to(torch.empty(0).device), persistent=False)
        self.scaling = float(scaling)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin), each [T, head_dim]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim] rotated by per-token cos/sin [T, head_dim]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin
