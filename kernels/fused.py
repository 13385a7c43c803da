"""Fused elementwise ops of a decoder layer, each one kernel launch on the GPU path.

    add_rmsnorm(x, residual, weight, eps, offset, backend) -> (normed, new_residual)
    rope_kv_write(q, k, v, positions, inv_freq, scaling, k_cache, v_cache, slot_mapping, backend)
        -> (q_rot, k_rot)
    act_mul(gate_up, activation, backend) -> out

`backend` is "triton" or "reference" (`loraplex.kernels.backend.choose_backend`, called once
by the model runner). The reference ops here are the torch code the model layers ran before
(`server/layers/norm.py`, `rotary.py`, `attention.store_kv`, the MLP): the same order of
operations and roundings, so "reference" is the CPU path and the kernels' oracle. The Triton
kernels (`triton_fused`) compute in float32 and round where the torch code rounds.

- add_rmsnorm: x, residual [T, hidden]; new_residual = x + residual in x's dtype (x itself,
  not a copy, when residual is None); normed = RMSNorm(new_residual) in float32. offset=0
  (Llama): cast back, then times w. offset=1.0 (Gemma, which stores w - 1): times (1 + w)
  in float32, then cast back.
- rope_kv_write: q [T, heads, D], k and v [T, kv_heads, D] (views of the fused qkv output
  are fine: any token stride, heads packed in a row); positions [T]; inv_freq float32 [D/2];
  scaling a float (cos and sin are multiplied by it, as transformers' scaled RoPE types do).
  Rotates q and k with rotate_half and cos/sin(positions * inv_freq) rounded to q's dtype,
  writes the rotated k and v to the caches `[num_blocks, block_size, kv_heads, D]` at the flat
  slot `block * block_size + offset` of `slot_mapping[t]`; a negative slot (padding of a
  fixed-size batch) writes nothing. Returns new contiguous q_rot [T, heads, D], k_rot [T, kv_heads, D].
- act_mul: gate_up [T, 2 * I], gate first; activation "silu", "gelu_tanh" (transformers'
  gelu_pytorch_tanh) or "gelu" (erf); out [T, I] = act(gate) * up in gate_up's dtype.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F

from loraplex.kernels.backend import check_backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": partial(F.gelu, approximate="tanh"),
    "gelu": F.gelu,
}
__all__ = ["ACTIVATIONS", "act_mul", "add_rmsnorm", "rope_kv_write"]


def add_rmsnorm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    offset: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(x + residual), x + residual); see the module docstring."""
    _check_rows("x", x)
    if residual is not None:
        _check_like("residual", residual, x)
    if weight.shape != (x.shape[1],) or weight.device != x.device:
        raise ValueError(
            f"weight must be [{x.shape[1]}] on {x.device}, got {tuple(weight.shape)} on {weight.device}"
        )
    if check_backend(backend) == "triton":
        from loraplex.kernels import triton_fused  # Triton is imported only where it runs

        return triton_fused.add_rmsnorm(x, residual, weight, eps, offset)
    hidden = x if residual is None else x + residual
    hf = hidden.float()
    hf = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    if offset:
        return (hf * (offset + weight.float())).type_as(hidden), hidden
    return weight * hf.type_as(hidden), hidden


def rope_kv_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    scaling: float,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotated (q, k); rotated k and v stored at their cache slots; see the module docstring."""
    _check_rope(q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping)
    if check_backend(backend) == "triton":
        from loraplex.kernels import triton_fused

        return triton_fused.rope_kv_write(
            q, k, v, positions, inv_freq, scaling, k_cache, v_cache, slot_mapping
        )
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = (emb.cos() * scaling).to(q.dtype)[:, None, :]
    sin = (emb.sin() * scaling).to(q.dtype)[:, None, :]
    q_rot, k_rot = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    # Boolean indexing waits for the device; the reference is the CPU path, where that is free.
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k_rot[keep])
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v[keep])
    return q_rot, k_rot


def act_mul(gate_up: torch.Tensor, activation: str, backend: str) -> torch.Tensor:
    """act(gate) * up for gate_up [T, 2 * I] -> [T, I]; see the module docstring."""
    _check_rows("gate_up", gate_up)
    if gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must have an even width, got {gate_up.shape[1]}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation {activation!r}: expected one of {sorted(ACTIVATIONS)}")
    if check_backend(backend) == "triton":
        from loraplex.kernels import triton_fused

        return triton_fused.act_mul(gate_up, activation)
    gate, up = gate_up.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _check_rows(name: str, t: torch.Tensor) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be [tokens, features], got {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} not in {FLOAT_DTYPES}")


def _check_like(name: str, t: torch.Tensor, like: torch.Tensor) -> None:
    if t.shape != like.shape or t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{name} is {tuple(t.shape)} {t.dtype} on {t.device}, expected {tuple(like.shape)} {like.dtype} on {like.device}"
        )


def _check_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    inv_freq: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    if q.dim() != 3 or q.dtype not in FLOAT_DTYPES:
        raise ValueError(f"q must be a float [tokens, heads, head_dim], got {tuple(q.shape)} {q.dtype}")
    num_tokens, _, head_dim = q.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if k.dim() != 3 or k.shape[0] != num_tokens or k.shape[2] != head_dim:
        raise ValueError(f"k must be [{num_tokens}, kv_heads, {head_dim}], got {tuple(k.shape)}")
    _check_like("v", v, k)
    if k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k is {k.dtype} on {k.device}, q {q.dtype} on {q.device}")
    cache_shape = (k_cache.shape[0], k_cache.shape[1], k.shape[1], head_dim)
    if k_cache.dim() != 4 or tuple(k_cache.shape) != cache_shape:
        raise ValueError(
            f"k_cache must be [blocks, block_size, {k.shape[1]}, {head_dim}], got {tuple(k_cache.shape)}"
        )
    _check_like("v_cache", v_cache, k_cache)
    if k_cache.dtype != q.dtype or k_cache.device != q.device:
        raise ValueError(f"the caches are {k_cache.dtype} on {k_cache.device}, q {q.dtype} on {q.device}")
    for name, t in (("positions", positions), ("slot_mapping", slot_mapping)):
        if t.shape != (num_tokens,) or t.dtype not in (torch.int32, torch.int64) or t.device != q.device:
            raise ValueError(
                f"{name} must be int32/int64 [{num_tokens}] on {q.device}, got {tuple(t.shape)} {t.dtype}"
            )
    if inv_freq.shape != (head_dim // 2,) or inv_freq.dtype != torch.float32 or inv_freq.device != q.device:
        raise ValueError(
            f"inv_freq must be float32 [{head_dim // 2}] on {q.device}, got {tuple(inv_freq.shape)}"
        )
