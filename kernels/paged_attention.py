"""Triton attention over the paged KV cache (DESIGN.md §5): decode and varlen prefill.

The cache layout is the engine's (`server/kv_cache.py`): per layer, keys and values
`[num_blocks, block_size, kv_heads, head_dim]`; position p of sequence b lives in block
`block_tables[b, p // block_size]` at offset `p % block_size`. Kernels read K/V through the
block table directly: nothing is gathered into a contiguous copy first.

- decode: one query token per sequence, at position `context_lens[b] - 1`. Grid
  (sequence, KV head, split): a program loads each K/V tile once for all the query heads that
  share its KV head (GQA), so K/V bytes stream once per step. Long contexts are split into
  partitions (flash-decoding) whose partial results a second kernel merges. The grid depends
  only on the shapes (padded sequence count, the block table's width), never on the context
  lengths; sequences with context length 0 and partitions past a sequence's end exit at once,
  so one launch shape replays under a CUDA graph.
- prefill: queries of several sequences packed `[tokens, heads, head_dim]`, sequence b's rows
  at `query_starts[b] .. query_starts[b+1]`; causal within the new tokens, over the cached
  prefix through the block table. Grid (query tile, head, sequence).

Both: scale (`query_pre_attn_scalar**-0.5` or `head_dim**-0.5`, the caller's choice), Gemma2's
logit softcapping `tanh(s / cap) * cap` before the mask, a sliding window (key k is seen
from query q when `q - window < k <= q`, as in transformers), float32 softmax and sums.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraplex.kernels import triton_common

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_DOT = 16  # tl.dot's smallest M, N and K
_MAX, _SUM = triton_common.MAX, triton_common.SUM  # tl.max/tl.sum break in the interpreter


@dataclass(frozen=True)
class AttentionSpec:
    """What a layer's attention computes besides q, k and v."""

    scale: float
    softcap: float | None = None  # Gemma2's attn_logit_softcapping
    sliding_window: int | None = None  # None: full causal attention


@dataclass(frozen=True)
class DecodeConfig:
    block_n: int  # keys per tile (power of two, >= 16); independent of the cache's block size
    partition: int  # keys per split (a multiple of block_n)
    num_warps: int = 4
    num_stages: int = 2


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int  # query rows per program (power of two, >= 16)
    block_n: int  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_acc_ptr, part_ml_ptr, block_tables_ptr, context_lens_ptr,
    scale, softcap, window, block_size, heads_per_kv, partition, max_splits,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, SPLIT: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    start = 0
    if WINDOW:
        start = tl.maximum(context_len - window, 0)  # the query sits at context_len - 1
    lo = start + split * partition
    if lo >= context_len:
        return  # idle (padded) sequence, or a partition past this sequence's end
    hi = tl.minimum(lo + partition, context_len)
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < heads_per_kv
    heads = kv_head * heads_per_kv + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_g[:, None] & mask_d[None, :],
        other=0.0,
    )
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    m_i = tl.full((BLOCK_G,), -1.0e30, tl.float32)  # finite: a masked tile never yields inf - inf
    l_i = tl.full((BLOCK_G,), 0.0, tl.float32)
    acc = tl.full((BLOCK_G, BLOCK_D), 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < hi
        block = tl.load(table_ptr + pos // block_size, mask=mask_n, other=0).to(tl.int64)
        rows = block * stride_cb + (pos % block_size) * stride_cs + kv_head * stride_ch
        k = tl.load(  # K^T tile [BLOCK_D, BLOCK_N]
            k_cache_ptr + rows[None, :] + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0
        )
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        if SOFTCAP:
            x = s / softcap  # tanh from exp: no libdevice call, exact enough in float32
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x < 0, -t, t) * softcap
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(
            v_cache_ptr + rows[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    if SPLIT:  # unnormalised partials [seq, head, split, :] for the merge kernel
        part = (seq.to(tl.int64) * (heads_per_kv * tl.num_programs(1)) + heads) * max_splits + split
        tl.store(
            part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
            acc,
            mask=mask_g[:, None] & mask_d[None, :],
        )
        tl.store(part_ml_ptr + part * 2, m_i, mask=mask_g)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=mask_g)
    else:
        out = acc / l_i[:, None]
        out_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_g[:, None] & mask_d[None, :])


def _decode_merge_kernel(
    out_ptr, part_acc_ptr, part_ml_ptr, context_lens_ptr,
    window, partition, max_splits, stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, WINDOW: tl.constexpr,
):  # fmt: skip
    seq = tl.program_id(0)
    head = tl.program_id(1)
    context_len = tl.load(context_lens_ptr + seq)
    if context_len == 0:
        return
    span = context_len
    if WINDOW:
        span = tl.minimum(context_len, window)
    num_splits = (span + partition - 1) // partition
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_splits
    part = (seq.to(tl.int64) * tl.num_programs(1) + head) * max_splits + offs_s
    m = tl.load(part_ml_ptr + part * 2, mask=mask_s, other=float("-inf"))
    l = tl.load(part_ml_ptr + part * 2 + 1, mask=mask_s, other=0.0)  # noqa: E741
    weight = tl.exp(m - tl.reduce(m, 0, _MAX))  # partitions that were not run weigh exp(-inf) = 0
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    acc = tl.load(
        part_acc_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
        mask=mask_s[:, None] & mask_d[None, :],
        other=0.0,
    )
    out = tl.reduce(acc * weight[:, None], 0, _SUM) / tl.reduce(l * weight, 0, _SUM)
    out_ptrs = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_d)


def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, context_lens_ptr, query_starts_ptr,
    scale, softcap, window, block_size, heads_per_kv,
    stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_ot, stride_oh, stride_bt,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    SOFTCAP: tl.constexpr, WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    q_start = tl.load(query_starts_ptr + seq)
    q_len = tl.load(query_starts_ptr + seq + 1) - q_start
    if tile * BLOCK_M >= q_len:
        return  # this sequence has fewer query tiles than the longest one
    context_len = tl.load(context_lens_ptr + seq)
    first = context_len - q_len + tile * BLOCK_M  # position of the tile's first query
    offs_m = tl.arange(0, BLOCK_M)
    mask_m = tile * BLOCK_M + offs_m < q_len
    q_pos = first + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + tile * BLOCK_M + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    kv_head = head // heads_per_kv
    table_ptr = block_tables_ptr + seq.to(tl.int64) * stride_bt
    hi = tl.minimum(first + BLOCK_M, context_len)
    lo = 0
    if WINDOW:
        lo = tl.maximum(first - window + 1, 0)
    m_i = tl.full((BLOCK_M,), -1.0e30, tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        mask_n = pos < hi
        block = tl.load(table_ptr + pos // block_size, mask=mask_n, other=0).to(tl.int64)
        rows = block * stride_cb + (pos % block_size) * stride_cs + kv_head * stride_ch
        k = tl.load(
            k_cache_ptr + rows[None, :] + offs_d[:, None], mask=mask_n[None, :] & mask_d[:, None], other=0.0
        )
        s = tl.dot(q, k, input_precision=PRECISION) * scale
        if SOFTCAP:
            x = s / softcap
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x < 0, -t, t) * softcap
        seen = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        if WINDOW:
            seen = seen & (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(seen, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(
            v_cache_ptr + rows[:, None] + offs_d[None, :], mask=mask_n[:, None] & mask_d[None, :], other=0.0
        )
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # rows past q_len saw nothing and are not stored
    out_ptrs = out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :]
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# Per-call values that are often 1 (or 16) would otherwise compile a variant each.
_NO_SPECIALIZE = {
    _decode_kernel: ("window", "block_size", "heads_per_kv", "partition", "max_splits"),
    _decode_merge_kernel: ("window", "partition", "max_splits"),
    _prefill_kernel: ("window", "block_size", "heads_per_kv"),
}


def _kernel(fn: Callable, interpret: bool):
    return triton_common.kernel(fn, interpret, _NO_SPECIALIZE[fn])


def paged_decode_attention(
    q: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    spec: AttentionSpec,
    out: torch.Tensor | None = None,
    config: DecodeConfig | None = None,
) -> torch.Tensor:
    """out[b, h] = attention of q[b, h] (position context_lens[b] - 1) over positions < context_lens[b].

    q, out [B, heads, head_dim]; block_tables int32 [B, max_blocks]; context_lens int32 [B]
    (0: an idle row, its out row is left as it is). The launch shape depends only on the
    tensors' shapes: the split count is bounded by `max_blocks * block_size`.
    """
    key_cache, value_cache = kv_cache
    _check_common(q, key_cache, value_cache, block_tables, context_lens)
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    assert block_tables.shape[0] == num_seqs, "one block table row per query row"
    out = _check_out(q, out)
    max_context = block_tables.shape[1] * block_size
    if spec.sliding_window is not None:
        max_context = min(max_context, spec.sliding_window)
    if num_seqs == 0 or max_context == 0:
        return out
    config = config or decode_config(num_seqs, num_kv_heads, head_dim, max_context, q.device)
    assert config.partition % config.block_n == 0, "a partition is whole key tiles"
    num_splits = triton.cdiv(max_context, config.partition)
    heads_per_kv = num_heads // num_kv_heads
    block_d = triton.next_power_of_2(max(head_dim, MIN_DOT))
    split = num_splits > 1
    # Partials are float32 [B, heads, splits, block_d] plus (max, sum) pairs; unused when not split.
    parts = (num_seqs * num_heads * num_splits) if split else 1
    part_acc = torch.empty(parts, block_d, dtype=torch.float32, device=q.device)
    part_ml = torch.empty(parts, 2, dtype=torch.float32, device=q.device)
    _kernel(_decode_kernel, q.device.type == "cpu")[(num_seqs, num_kv_heads, num_splits)](
        q, key_cache, value_cache, out, part_acc, part_ml, block_tables, context_lens,
        spec.scale, spec.softcap or 1.0, spec.sliding_window or 0, block_size, heads_per_kv,
        config.partition, num_splits,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(MIN_DOT, triton.next_power_of_2(heads_per_kv)),
        BLOCK_N=config.block_n, SOFTCAP=spec.softcap is not None, WINDOW=spec.sliding_window is not None,
        SPLIT=split, PRECISION=triton_common.dot_precision(q.dtype),
        num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
    )  # fmt: skip
    if split:
        _merge_partials(out, part_acc, part_ml, context_lens, spec, config.partition, num_splits)
    return out


def _merge_partials(
    out: torch.Tensor,
    part_acc: torch.Tensor,
    part_ml: torch.Tensor,
    context_lens: torch.Tensor,
    spec: AttentionSpec,
    partition: int,
    num_splits: int,
) -> None:
    num_seqs, num_heads, head_dim = out.shape
    _kernel(_decode_merge_kernel, out.device.type == "cpu")[(num_seqs, num_heads)](
        out, part_acc, part_ml, context_lens,
        spec.sliding_window or 0, partition, num_splits, out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=part_acc.shape[1], BLOCK_S=triton.next_power_of_2(num_splits),
        WINDOW=spec.sliding_window is not None, num_warps=4, enable_fp_fusion=True,
    )  # fmt: skip


def paged_prefill_attention(
    q: torch.Tensor,
    kv_cache: tuple[torch.Tensor, torch.Tensor],
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    query_starts: torch.Tensor,
    max_query_len: int,
    spec: AttentionSpec,
    out: torch.Tensor | None = None,
    config: PrefillConfig | None = None,
) -> torch.Tensor:
    """Causal attention of packed new tokens over their sequences' cached prefix and themselves.

    q, out [T, heads, head_dim]; sequence b's queries are rows query_starts[b] .. query_starts[b+1]
    (int32 [B + 1]) at positions context_lens[b] - their count ..; `max_query_len` (a host int,
    no device sync) bounds the query tiles of the grid. K/V of the new tokens are in the cache.
    """
    key_cache, value_cache = kv_cache
    _check_common(q, key_cache, value_cache, block_tables, context_lens)
    assert query_starts.shape == (block_tables.shape[0] + 1,), "query_starts must be [B + 1]"
    assert query_starts.dtype == torch.int32 and query_starts.device == q.device
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    out = _check_out(q, out)
    num_seqs = block_tables.shape[0]
    if num_tokens == 0 or num_seqs == 0 or max_query_len == 0:
        return out
    config = config or prefill_config(head_dim)
    grid = (triton.cdiv(max_query_len, config.block_m), num_heads, num_seqs)
    _kernel(_prefill_kernel, q.device.type == "cpu")[grid](
        q, key_cache, value_cache, out, block_tables, context_lens, query_starts,
        spec.scale, spec.softcap or 1.0, spec.sliding_window or 0, block_size, num_heads // num_kv_heads,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        out.stride(0), out.stride(1), block_tables.stride(0),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(max(head_dim, MIN_DOT)), BLOCK_M=config.block_m,
        BLOCK_N=config.block_n, SOFTCAP=spec.softcap is not None, WINDOW=spec.sliding_window is not None,
        PRECISION=triton_common.dot_precision(q.dtype), num_warps=config.num_warps, num_stages=config.num_stages,
        enable_fp_fusion=True,
    )  # fmt: skip
    return out


def decode_config(
    num_seqs: int, num_kv_heads: int, head_dim: int, max_context: int, device: torch.device
) -> DecodeConfig:
    """Split long contexts until (sequence, KV head, split) programs fill the SMs about twice.

    Depends on shapes only (a captured CUDA graph stays valid whatever the context lengths).
    """
    block_n = 64 if head_dim <= 128 else 32  # a K and a V tile of 16-bit [256, 32] in registers
    programs = num_seqs * num_kv_heads
    splits = max(1, triton.cdiv(2 * triton_common.num_sms(device), programs))
    # A partition below ~256 keys spends more on writing and merging partials than it saves.
    partition = max(4 * block_n, triton.next_power_of_2(triton.cdiv(max_context, splits)))
    return DecodeConfig(block_n=block_n, partition=partition)


def prefill_config(head_dim: int) -> PrefillConfig:
    """64 query rows; narrower key tiles and more warps for wide heads (a float32 [64, 256]
    accumulator over 128 threads would not fit in registers)."""
    if head_dim <= 64:
        return PrefillConfig(block_m=64, block_n=64)
    if head_dim <= 128:
        return PrefillConfig(block_m=64, block_n=64, num_warps=8)
    return PrefillConfig(block_m=64, block_n=32, num_warps=8)


def _check_common(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
) -> None:
    assert q.dim() == 3 and q.dtype in FLOAT_DTYPES, "q must be [tokens, heads, head_dim] float"
    assert q.stride(2) == 1, "q rows must be contiguous"
    # Triton 3.9's interpreter returns garbage from tl.dot on bf16 operands (DESIGN.md §6)
    assert q.device.type != "cpu" or q.dtype != torch.bfloat16, (
        "bf16 runs on the GPU only, not the interpreter"
    )
    assert key_cache.dim() == 4, "caches must be [blocks, block_size, kv_heads, head_dim]"
    assert key_cache.shape == value_cache.shape and key_cache.stride() == value_cache.stride()
    assert key_cache.is_contiguous(), "the caches must be contiguous"
    assert key_cache.dtype == value_cache.dtype == q.dtype, "q and the caches must share a dtype"
    assert key_cache.device == value_cache.device == q.device
    assert key_cache.shape[3] == q.shape[2], "q and the caches must share head_dim"
    assert q.shape[1] % key_cache.shape[2] == 0, "heads must be a multiple of KV heads"
    assert block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be int32 [B, n]"
    assert block_tables.stride(1) == 1 and block_tables.device == q.device
    assert context_lens.shape == (block_tables.shape[0],), "context_lens must be [B]"
    assert context_lens.dtype == torch.int32 and context_lens.device == q.device


def _check_out(q: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    if out is None:
        return torch.empty_like(q)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device, "out must be like q"
    assert out.stride(2) == 1, "out rows must be contiguous"
    return out
