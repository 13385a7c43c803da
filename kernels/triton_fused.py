"""Triton kernels of `loraplex.kernels.fused`: one launch each, float32 math, torch's roundings.

Each kernel rounds to the model dtype exactly where the torch code it replaces does (after the
residual add, after the activation, each RoPE product), so half-precision results stay within
an ulp of the eager model and float32 ones within float32 rounding. The grids depend on the
shapes only (CUDA-graph safe): add_rmsnorm one program per token row, rope_kv_write one per
(token, q or kv head), act_mul one per (token, column block).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.kernels import triton_common

_SUM = triton_common.SUM
_ACT_IDS = {"silu": 0, "gelu_tanh": 1, "gelu": 2}
_ACT_BLOCK = 1024  # columns per act_mul program
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # kernels read constexpr globals only
_SQRT_HALF = tl.constexpr(0.7071067811865476)


def _add_rmsnorm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, new_res_ptr,
    hidden, eps, offset, stride_x, stride_r, stride_o, stride_n,
    HAS_RESIDUAL: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    h = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(new_res_ptr.dtype.element_ty)  # rounded, as in torch
        tl.store(new_res_ptr + row * stride_n + cols, h, mask=mask)
    hf = h.to(tl.float32)
    hf = hf * tl.rsqrt(tl.reduce(hf * hf, 0, _SUM) / hidden + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:  # noqa: SIM108 (two roundings worth a comment each)
        out = hf * (offset + w)  # Gemma: multiply in float32, then round
    else:
        out = w * hf.to(h.dtype).to(tl.float32)  # Llama: round, then multiply
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, inv_freq_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, q_out_ptr, k_out_ptr,
    scaling, num_heads, block_size, stride_qt, stride_kt, stride_vt, stride_cb, stride_cs,
    stride_qot, stride_kot,
    HALF: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)  # q heads first, then kv heads
    kv_head = head - num_heads
    offs = tl.arange(0, BLOCK)
    mask = offs < HALF
    freqs = tl.load(pos_ptr + t).to(tl.float32) * tl.load(inv_freq_ptr + offs, mask=mask, other=0.0)
    dtype = q_out_ptr.dtype.element_ty
    cos = (tl.cos(freqs) * scaling).to(dtype).to(tl.float32)  # torch rounds the tables to the model dtype
    sin = (tl.sin(freqs) * scaling).to(dtype).to(tl.float32)
    src = q_ptr + t * stride_qt + head * (2 * HALF)
    dst = q_out_ptr + t * stride_qot + head * (2 * HALF)
    if kv_head >= 0:
        src = k_ptr + t * stride_kt + kv_head * (2 * HALF)
        dst = k_out_ptr + t * stride_kot + kv_head * (2 * HALF)
    # x * cos + rotate_half(x) * sin, each product rounded like torch's
    x1 = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF + offs, mask=mask, other=0.0).to(tl.float32)
    o1 = ((x1 * cos).to(dtype).to(tl.float32) - (x2 * sin).to(dtype).to(tl.float32)).to(dtype)
    o2 = ((x2 * cos).to(dtype).to(tl.float32) + (x1 * sin).to(dtype).to(tl.float32)).to(dtype)
    tl.store(dst + offs, o1, mask=mask)
    tl.store(dst + HALF + offs, o2, mask=mask)
    if kv_head >= 0:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        if slot >= 0:  # negative: a padding row of a fixed-size batch, stored nowhere
            at = (slot // block_size) * stride_cb + (slot % block_size) * stride_cs + kv_head * (2 * HALF)
            tl.store(k_cache_ptr + at + offs, o1, mask=mask)
            tl.store(k_cache_ptr + at + HALF + offs, o2, mask=mask)
            v_src = v_ptr + t * stride_vt + kv_head * (2 * HALF)
            tl.store(v_cache_ptr + at + offs, tl.load(v_src + offs, mask=mask), mask=mask)
            tl.store(v_cache_ptr + at + HALF + offs, tl.load(v_src + HALF + offs, mask=mask), mask=mask)


def _act_mul_kernel(
    gate_up_ptr, out_ptr, inter, stride_g, stride_o,
    ACT: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(gate_up_ptr + t * stride_g + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + t * stride_g + inter + cols, mask=mask, other=0.0)
    dtype = g.dtype
    g = g.to(tl.float32)
    if ACT == 0:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == 1:
        inner = _SQRT_2_OVER_PI * (g + 0.044715 * g * g * g)
        # tanh(y) = 1 - 2 / (e^2y + 1): saturates to +-1 without NaN when e^2y overflows
        a = 0.5 * g * (2.0 - 2.0 / (tl.exp(2.0 * inner) + 1.0))
    else:
        a = 0.5 * g * (1.0 + tl.erf(g * _SQRT_HALF))
    out = a.to(dtype).to(tl.float32) * up.to(tl.float32)  # torch rounds act(gate) before the product
    tl.store(out_ptr + t * stride_o + cols, out.to(dtype), mask=mask)


def _kernel(fn, device: torch.device):
    return triton_common.kernel(fn, device.type == "cpu")


def _warps(block: int) -> int:
    return min(16, max(4, block // 512))


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `loraplex.kernels.fused.add_rmsnorm` (which checks shapes and dtypes)."""
    assert x.stride(1) == 1, "x rows must be contiguous"
    assert residual is None or residual.stride(1) == 1, "residual rows must be contiguous"
    assert weight.is_contiguous() and weight.dtype == x.dtype, "weight must be contiguous, of x's dtype"
    num_tokens, hidden = x.shape
    out = torch.empty((num_tokens, hidden), dtype=x.dtype, device=x.device)
    new_residual = x if residual is None else torch.empty_like(out)
    if num_tokens == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    res = x if residual is None else residual
    _kernel(_add_rmsnorm_kernel, x.device)[(num_tokens,)](
        x, res, weight, out, new_residual,
        hidden, float(eps), float(offset), x.stride(0), res.stride(0), out.stride(0), new_residual.stride(0),
        HAS_RESIDUAL=residual is not None, HAS_OFFSET=bool(offset), BLOCK=block, num_warps=_warps(block), enable_fp_fusion=False,
    )  # fmt: skip
    return out, new_residual


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `loraplex.kernels.fused.rope_kv_write` (which checks shapes and dtypes)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    for name, t in (("q", q), ("k", k), ("v", v)):
        assert t.stride(2) == 1 and t.stride(1) == head_dim, f"{name} must hold its heads packed in a row"
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        assert t.stride(3) == 1 and t.stride(2) == head_dim, f"{name} must hold its heads packed in a slot"
    assert k_cache.stride() == v_cache.stride(), "k_cache and v_cache must share a layout"
    assert inv_freq.is_contiguous() and positions.is_contiguous() and slot_mapping.is_contiguous()
    q_rot = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    k_rot = torch.empty((num_tokens, num_kv_heads, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_rot, k_rot
    half = head_dim // 2
    _kernel(_rope_kv_kernel, q.device)[(num_tokens, num_heads + num_kv_heads)](
        q, k, v, positions, inv_freq, k_cache, v_cache, slot_mapping, q_rot, k_rot,
        float(scaling), num_heads, k_cache.shape[1], q.stride(0), k.stride(0), v.stride(0),
        k_cache.stride(0), k_cache.stride(1), q_rot.stride(0), k_rot.stride(0),
        HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1 if half <= 64 else 2, enable_fp_fusion=False,
    )  # fmt: skip
    return q_rot, k_rot


def act_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """See `loraplex.kernels.fused.act_mul` (which checks shapes, dtypes and the activation)."""
    assert gate_up.stride(1) == 1, "gate_up rows must be contiguous"
    num_tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(_ACT_BLOCK, triton.next_power_of_2(inter))
    _kernel(_act_mul_kernel, gate_up.device)[(num_tokens, triton.cdiv(inter, block))](
        gate_up, out, inter, gate_up.stride(0), out.stride(0),
        ACT=_ACT_IDS[activation], BLOCK=block, num_warps=_warps(block), enable_fp_fusion=False,
    )  # fmt: skip
    return out
