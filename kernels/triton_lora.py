"""Triton kernels for batched LoRA over a batch that mixes adapters (DESIGN.md §6).

Decode-sized LoRA is a memory-bound batched GEMV: each distinct adapter's A and B must be
streamed once, and there is almost no arithmetic to hide latency behind. So the work is cut
into many small, independent programs that all stream adapter bytes at once:

- shrink: grid (token tile, K split x rank step, slice). Each program multiplies one tile of
  one slot's tokens by a [BLOCK_R, k_per_split] block of that slot's A and adds its partial
  sums into float32 y (atomics when K is split). Splitting K and rank is what spreads a
  32-adapter decode step over all SMs; rank steps beyond a slot's rank exit at once.
- expand: grid (token tile, output block over all slices). Each (token, column) has exactly
  one writer, so out is read, added to and written without atomics.

The token-tile axis is the fixed-size tile table of `LoraBatchMeta`: its length depends only
on T and the slot count, idle entries exit at once, so one launch shape serves every batch
composition (CUDA-graph safe, no host sync). Both kernels cover a slot's own rank in
BLOCK_R steps (shrink: one program per step; expand: a pipelined loop): a rank-8 adapter
next to a rank-64 one reads and multiplies 16 rows of which 8 are loaded, not 64.
Up to three slices share a launch (q/k/v of different widths, gate/up); more are chunked.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraplex.kernels import triton_common
from loraplex.kernels.meta import TOKEN_BLOCK, LoraBatchMeta, max_tiles
from loraplex.kernels.shapes import check_expand, check_shrink

MAX_SLICES = 3  # slice pointers are kernel arguments, not a device table: no per-call H2D copy
BLOCK_R = 16  # rank step: tl.dot's smallest K/N


@dataclass(frozen=True)
class ShrinkConfig:
    block_k: int  # power of two, >= 16
    split_k: int  # K splits; > 1 accumulates into y with atomics
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class ExpandConfig:
    block_n: int  # power of two, >= 16
    num_warps: int = 4
    num_stages: int = 3


def _shrink_kernel(
    x_ptr, a0_ptr, a1_ptr, a2_ptr, y_ptr,
    sorted_ids_ptr, slot_ranks_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
    in_features, k_per_split, rank_steps, stride_xt, stride_a_slot, stride_a_rank, stride_ys, stride_yt,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    ATOMIC: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    split = tl.program_id(1) // rank_steps
    r0 = (tl.program_id(1) % rank_steps) * BLOCK_R
    s = tl.program_id(2)
    slot = tl.load(tile_slots_ptr + tile)
    if slot < 0:
        return  # idle entry of the fixed-size tile table
    rank = tl.load(slot_ranks_ptr + slot)
    if r0 >= rank:
        return  # this slot's adapter has a smaller rank than the buffers
    offs_m = tl.load(tile_starts_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_m = offs_m < tl.load(tile_ends_ptr + tile)
    tokens = tl.load(sorted_ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    a_ptr = a0_ptr
    if s == 1:
        a_ptr = a1_ptr
    if s == 2:
        a_ptr = a2_ptr
    a_ptr += slot.to(tl.int64) * stride_a_slot
    rows = r0 + tl.arange(0, BLOCK_R)
    mask_r = rows < rank
    offs_k = tl.arange(0, BLOCK_K)
    k_begin = split * k_per_split
    k_end = tl.minimum(k_begin + k_per_split, in_features)
    acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + offs_k
        # Masks constant along K let Triton vectorise the loads (16 bytes a thread)
        mask_x = mask_m[:, None] if EVEN_K else mask_m[:, None] & (ks[None, :] < in_features)
        mask_a = mask_r[None, :] if EVEN_K else mask_r[None, :] & (ks[:, None] < in_features)
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + ks[None, :], mask=mask_x, other=0.0)
        # A^T strip [BLOCK_K, BLOCK_R]; rows beyond the rank are never read
        a = tl.load(a_ptr + rows[None, :] * stride_a_rank + ks[:, None], mask=mask_a, other=0.0)
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    y_ptrs = y_ptr + s * stride_ys + tokens[:, None] * stride_yt + rows[None, :]
    mask_y = mask_m[:, None] & mask_r[None, :]
    if ATOMIC:
        tl.atomic_add(y_ptrs, acc, mask=mask_y, sem="relaxed")
    else:
        tl.store(y_ptrs, acc, mask=mask_y)


def _expand_kernel(
    y_ptr, b0_ptr, b1_ptr, b2_ptr, out_ptr,
    sorted_ids_ptr, slot_ranks_ptr, tile_slots_ptr, tile_starts_ptr, tile_ends_ptr,
    width0, width1, width2, col1, col2, blocks0, blocks01, max_rank, stride_ys, stride_yt, stride_ot,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, RANK_ALIGN: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    tile = tl.program_id(0)
    block = tl.program_id(1)  # output block over the concatenated slices
    slot = tl.load(tile_slots_ptr + tile)
    if slot < 0:
        return
    rank = tl.load(slot_ranks_ptr + slot)
    offs_m = tl.load(tile_starts_ptr + tile) + tl.arange(0, BLOCK_M)
    mask_m = offs_m < tl.load(tile_ends_ptr + tile)
    tokens = tl.load(sorted_ids_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    # which slice this block falls in, by arithmetic: no divergent branches, no idle blocks
    past0 = (block >= blocks0).to(tl.int32)
    past1 = (block >= blocks01).to(tl.int32)
    s = past0 + past1
    block -= past0 * blocks0 + past1 * (blocks01 - blocks0)
    width = width0 + past0 * (width1 - width0) + past1 * (width2 - width1)
    col0 = past0 * col1 + past1 * (col2 - col1)
    b_ptr = b0_ptr
    if s == 1:
        b_ptr = b1_ptr
    if s == 2:
        b_ptr = b2_ptr
    b_ptr += slot.to(tl.int64) * width * max_rank  # B slices are contiguous [slots, width, max_rank]
    offs_n = block * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < width
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    # B rows hold a slot's rank contiguously: reading up to a multiple of RANK_ALIGN keeps the
    # mask constant over 16-byte vectors; the extra (stale) values are dropped by the where().
    rank_read = tl.multiple_of((rank + RANK_ALIGN - 1) // RANK_ALIGN * RANK_ALIGN, RANK_ALIGN)
    for r0 in range(0, rank, BLOCK_R):
        rows = r0 + offs_r
        mask_r = rows < rank
        y = tl.load(
            y_ptr + s * stride_ys + tokens[:, None] * stride_yt + rows[None, :],
            mask=mask_m[:, None] & mask_r[None, :],
            other=0.0,
        )
        b = tl.load(  # B^T strip [BLOCK_R, BLOCK_N]
            b_ptr + offs_n[None, :] * max_rank + rows[:, None],
            mask=(rows[:, None] < rank_read) & mask_n[None, :],
            other=0.0,
        )
        b = tl.where(mask_r[:, None], b, 0.0)
        # y rounds to the model dtype, as in a PEFT layer; the sum stays float32
        acc = tl.dot(y.to(b.dtype), b, acc, input_precision=PRECISION)
    out_ptrs = out_ptr + tokens[:, None] * stride_ot + col0 + offs_n[None, :]
    mask_o = mask_m[:, None] & mask_n[None, :]
    prev = tl.load(out_ptrs, mask=mask_o, other=0.0)
    tl.store(out_ptrs, (acc + prev.to(tl.float32)).to(prev.dtype), mask=mask_o)


# Block counts are often 1, which Triton would turn into a constant and compile a variant for;
# widths and strides keep their specialisation (divisibility by 16 enables vector loads).
_NO_SPECIALIZE = {_shrink_kernel: ("rank_steps",), _expand_kernel: ("blocks0", "blocks01")}


def _kernel(fn: Callable, interpret: bool):
    return triton_common.kernel(fn, interpret, _NO_SPECIALIZE[fn])


def lora_shrink(
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    config: ShrinkConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[s, t, :r] = x[t] @ A_s[slot(t)][:r]^T as float32 [slices, T, max_rank].

    Entries the contract leaves unspecified (tokens without an adapter, columns >= rank) are
    zero when K is split and uninitialised otherwise. `out`: a zero-filled y to accumulate
    into (see `loraplex.kernels.lora.lora_shrink`); no zero-fill is launched then.
    """
    check_shrink(x, a_slots, meta, out)
    _assert_layout(meta, x.device)
    assert x.stride(1) == 1, "x rows must be contiguous"
    assert all(a.is_contiguous() for a in a_slots), "A slot buffers must be contiguous"
    num_tokens, in_features = x.shape
    max_rank = a_slots[0].shape[1]
    config = config or shrink_config(
        num_tokens, meta.num_slots, in_features, max_rank, len(a_slots), x.device
    )
    k_per_split = triton.cdiv(triton.cdiv(in_features, config.block_k), config.split_k) * config.block_k
    split_k = triton.cdiv(in_features, k_per_split)
    rank_steps = triton.cdiv(max_rank, BLOCK_R)
    y = _new_y((len(a_slots), num_tokens, max_rank), x.device, zeroed=split_k > 1) if out is None else out
    if num_tokens == 0:
        return y
    kernel = _kernel(_shrink_kernel, x.device.type == "cpu")
    for first in range(0, len(a_slots), MAX_SLICES):
        chunk = list(a_slots[first : first + MAX_SLICES])
        padded = chunk + [chunk[0]] * (MAX_SLICES - len(chunk))
        grid = (max_tiles(num_tokens, meta.num_slots), split_k * rank_steps, len(chunk))
        kernel[grid](
            x, *padded, y[first:],
            *_tile_args(meta),
            in_features, k_per_split, rank_steps, x.stride(0), chunk[0].stride(0), chunk[0].stride(1),
            y.stride(0), y.stride(1),
            BLOCK_M=TOKEN_BLOCK, BLOCK_R=BLOCK_R, BLOCK_K=config.block_k, EVEN_K=in_features % config.block_k == 0,
            ATOMIC=split_k > 1, PRECISION=triton_common.dot_precision(x.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
        )  # fmt: skip
    return y


def lora_expand(
    y: torch.Tensor,
    b_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    out: torch.Tensor,
    add: bool = True,
    config: ExpandConfig | None = None,
) -> torch.Tensor:
    """out[t, off_s:off_s+out_s] (+)= y[s, t, :r] @ B_s[slot(t)][:, :r]^T in place; returns out."""
    check_expand(y, b_slots, meta, out)
    _assert_layout(meta, out.device)
    assert y.dtype == torch.float32 and y.is_contiguous(), "y must be contiguous float32"
    assert out.stride(1) == 1, "out rows must be contiguous"
    assert all(b.is_contiguous() for b in b_slots), "B slot buffers must be contiguous"
    if not add:
        out.zero_()  # tokens without an adapter get zeros; the kernel then adds for the others
    num_tokens, max_rank = out.shape[0], y.shape[2]
    if num_tokens == 0:
        return out
    config = config or expand_config(num_tokens, meta.num_slots, out.shape[1], max_rank, out.device)
    kernel = _kernel(_expand_kernel, out.device.type == "cpu")
    column = 0
    for first in range(0, len(b_slots), MAX_SLICES):
        chunk = list(b_slots[first : first + MAX_SLICES])
        widths = [b.shape[1] for b in chunk] + [0] * (MAX_SLICES - len(chunk))
        padded = chunk + [chunk[0]] * (MAX_SLICES - len(chunk))
        blocks = [triton.cdiv(w, config.block_n) for w in widths]
        grid = (max_tiles(num_tokens, meta.num_slots), sum(blocks))
        kernel[grid](
            y[first:], *padded, out[:, column:],
            *_tile_args(meta),
            widths[0], widths[1], widths[2], widths[0], widths[0] + widths[1],
            blocks[0], blocks[0] + blocks[1], max_rank, y.stride(0), y.stride(1), out.stride(0),
            BLOCK_M=TOKEN_BLOCK, BLOCK_N=config.block_n, BLOCK_R=BLOCK_R, RANK_ALIGN=_rank_align(max_rank, out),
            PRECISION=triton_common.dot_precision(out.dtype),
            num_warps=config.num_warps, num_stages=config.num_stages, enable_fp_fusion=True,
        )  # fmt: skip
        column += sum(widths)
    return out


def shrink_config(
    num_tokens: int, num_slots: int, in_features: int, max_rank: int, num_slices: int, device: torch.device
) -> ShrinkConfig:
    """Split K into BLOCK_K strips, one per program, until the grid is a few waves deep.

    Depends on shapes only, never on the batch composition (a captured graph stays valid).
    """
    block_k = min(256, max(16, triton.next_power_of_2(in_features)))
    programs = max_tiles(num_tokens, num_slots) * min(num_slices, MAX_SLICES) * triton.cdiv(max_rank, BLOCK_R)
    most = 16 * triton_common.num_sms(device)  # a few waves of resident programs (about 8 fit on an SM)
    k_blocks = triton.cdiv(in_features, block_k)
    split_k = max(1, min(k_blocks, most // max(1, programs)))
    # One K block per program: nothing to pipeline, and without staging buffers in shared
    # memory more programs fit on an SM, so more bytes are in flight.
    return ShrinkConfig(block_k=block_k, split_k=split_k, num_stages=1 if split_k == k_blocks else 3)


def expand_config(
    num_tokens: int, num_slots: int, width: int, max_rank: int, device: torch.device
) -> ExpandConfig:
    """The widest output block (8 KB of 16-bit B per rank step) that still fills the SMs twice."""
    tiles = max_tiles(num_tokens, num_slots)
    for block_n in (256, 128, 64):
        if tiles * triton.cdiv(width, block_n) >= 2 * triton_common.num_sms(device):
            break
    return ExpandConfig(block_n=block_n, num_stages=1 if max_rank <= BLOCK_R else 3)


def _new_y(shape: tuple[int, int, int], device: torch.device, zeroed: bool) -> torch.Tensor:
    # atomics need zeros; plain stores need nothing (the unwritten entries are unspecified)
    alloc = torch.zeros if zeroed else torch.empty
    return alloc(shape, dtype=torch.float32, device=device)


def _rank_align(max_rank: int, out: torch.Tensor) -> int:
    """Elements per 16-byte vector when B rows are long enough to read whole vectors."""
    vector = 16 // out.element_size()
    return vector if max_rank % vector == 0 else 1


def _tile_args(meta: LoraBatchMeta) -> tuple[torch.Tensor, ...]:
    return meta.sorted_token_ids, meta.slot_ranks, meta.tile_slots, meta.tile_starts, meta.tile_ends


def _assert_layout(meta: LoraBatchMeta, device: torch.device) -> None:
    for t in _tile_args(meta):
        assert t.device == device, f"meta is on {t.device}, the operands on {device}"
        assert t.dtype == torch.int32 and t.is_contiguous(), "meta tensors must be contiguous int32"
