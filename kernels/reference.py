"""Torch reference ops (gather + bmm): the CPU path of the engine and the kernels' oracle.

Same signatures and contract as the Triton kernels. Values in slot buffers beyond an
adapter's rank are never used (they are masked, so stale data from a bigger adapter that
held the slot before cannot leak in). y is float32; rows of tokens without an adapter and
columns >= the token's rank are zero here (the contract leaves them unspecified).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.kernels.meta import LoraBatchMeta
from loraplex.kernels.shapes import check_expand, check_shrink

# Bytes of gathered per-token adapter weights materialised at once; bounds memory on long prefills.
GATHER_BYTES = 64 << 20


def lora_shrink(x: torch.Tensor, a_slots: Sequence[torch.Tensor], meta: LoraBatchMeta) -> torch.Tensor:
    """y[s, t, :r] = x[t] @ A_s[slot(t)][:r]^T, float32 [slices, T, max_rank]."""
    check_shrink(x, a_slots, meta)
    num_tokens, max_rank = x.shape[0], a_slots[0].shape[1]
    y = torch.zeros((len(a_slots), num_tokens, max_rank), dtype=torch.float32, device=x.device)
    slots, rank_mask = _token_slots(meta, max_rank)
    compute = _compute_dtype(x)
    for rows in _token_chunks(num_tokens, max_rank * x.shape[1] * 4):
        x_rows = x[rows].to(compute).unsqueeze(1)  # [t, 1, in]
        mask = rank_mask[rows].unsqueeze(2)  # [t, R, 1]
        for s, a in enumerate(a_slots):
            a_rows = a[slots[rows]].masked_fill(~mask, 0).to(compute)  # [t, R, in]
            y[s, rows] = torch.bmm(x_rows, a_rows.transpose(1, 2)).squeeze(1).float()
    return y


def lora_expand(
    y: torch.Tensor,
    b_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    out: torch.Tensor,
    add: bool = True,
) -> torch.Tensor:
    """out[t, off_s:off_s+out_s] (+)= y[s, t, :r] @ B_s[slot(t)][:, :r]^T, in place."""
    check_expand(y, b_slots, meta, out)
    max_rank = b_slots[0].shape[2]
    slots, rank_mask = _token_slots(meta, max_rank)
    has_adapter = rank_mask[:, :1]  # [T, 1]: rank >= 1 exactly when the token has an adapter
    compute = _compute_dtype(out)
    widest = max(b.shape[1] for b in b_slots)
    for rows in _token_chunks(meta.num_tokens, widest * max_rank * 4):
        mask = rank_mask[rows]
        offset = 0
        for s, b in enumerate(b_slots):
            width = b.shape[1]
            y_rows = y[s, rows].masked_fill(~mask, 0).to(compute).unsqueeze(2)  # [t, R, 1]
            b_rows = b[slots[rows]].masked_fill(~mask.unsqueeze(1), 0).to(compute)  # [t, out_s, R]
            delta = torch.bmm(b_rows, y_rows).squeeze(2).float()
            cols = out[rows, offset : offset + width]
            base = cols.float() + delta if add else delta
            # where() rather than adding zeros: tokens without an adapter keep out bit for bit
            fallback = cols if add else torch.zeros_like(cols)
            cols.copy_(torch.where(has_adapter[rows], base.to(out.dtype), fallback))
            offset += width
    return out


def _token_slots(meta: LoraBatchMeta, max_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: a gatherable slot index and the mask r < rank(slot) (all False without an adapter)."""
    slots = meta.token_slots.to(torch.int64)
    gather_slots = slots.clamp(min=0)
    ranks = torch.where(slots >= 0, meta.slot_ranks.to(torch.int64)[gather_slots], 0)
    columns = torch.arange(max_rank, device=slots.device)
    return gather_slots, columns.unsqueeze(0) < ranks.unsqueeze(1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision matmuls on CPU are slow or missing; CUDA's accumulate in float32 anyway.
    return t.dtype if t.is_cuda else torch.float32


def _token_chunks(num_tokens: int, bytes_per_token: int) -> list[slice]:
    step = max(1, GATHER_BYTES // max(1, bytes_per_token))
    return [slice(i, min(i + step, num_tokens)) for i in range(0, num_tokens, step)]
