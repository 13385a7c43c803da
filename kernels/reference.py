"""Torch reference ops: the CPU path of the engine and the kernels' oracle.

Same signatures and contract as the Triton kernels. Tokens are taken slot by slot in the
order `LoraBatchMeta` sorted them: each active adapter costs one `[n, in] @ A^T` and one
`[n, r] @ B^T` per slice on its own n tokens, with A and B read in place (rows and columns
beyond an adapter's rank are never touched, so stale data from a bigger adapter that held the
slot before cannot leak in). A slot whose tokens are consecutive in the batch (a prefill, or
one adapter for the whole batch) works on views, others gather their rows once per call.
y is float32; rows of tokens without an adapter and columns >= the token's rank are zero here
(the contract leaves them unspecified).

The slot plan is read on the host (`tolist`): free on the CPU, a sync on an accelerator,
where the Triton kernels run instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from loraplex.kernels.meta import LoraBatchMeta
from loraplex.kernels.shapes import check_expand, check_shrink

Rows = slice | torch.Tensor  # consecutive token rows as a slice, others as an index tensor


def lora_shrink(
    x: torch.Tensor, a_slots: Sequence[torch.Tensor], meta: LoraBatchMeta, out: torch.Tensor | None = None
) -> torch.Tensor:
    """y[s, t, :r] = x[t] @ A_s[slot(t)][:r]^T, float32 [slices, T, max_rank] (into a zeroed `out`)."""
    check_shrink(x, a_slots, meta, out)
    num_tokens, max_rank = x.shape[0], a_slots[0].shape[1]
    y = (
        torch.zeros((len(a_slots), num_tokens, max_rank), dtype=torch.float32, device=x.device)
        if out is None
        else out
    )
    compute = _compute_dtype(x)
    for slot, rank, rows in _slot_groups(meta):
        xs = x[rows].to(compute)  # [n, in]
        for s, a in enumerate(a_slots):
            y[s, rows, :rank] = (xs @ a[slot, :rank].to(compute).T).float()
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
    if not add:
        out.zero_()  # tokens without an adapter get zeros
    compute = _compute_dtype(out)
    for slot, rank, rows in _slot_groups(meta):
        block = out[rows]  # a view for consecutive rows, else a copy written back below
        offset = 0
        for s, b in enumerate(b_slots):
            width = b.shape[1]
            delta = (y[s, rows, :rank].to(compute) @ b[slot, :, :rank].to(compute).T).float()
            cols = block[:, offset : offset + width]
            cols.copy_(cols.float() + delta if add else delta)
            offset += width
        if not isinstance(rows, slice):
            out.index_copy_(0, rows, block)
    return out


def _slot_groups(meta: LoraBatchMeta) -> Iterator[tuple[int, int, Rows]]:
    """(slot, rank, token rows) of each slot holding tokens, from the metadata's sorted order."""
    counts, starts = meta.slot_counts.tolist(), meta.slot_starts.tolist()
    ranks = meta.slot_ranks.tolist()
    sorted_ids = meta.sorted_token_ids.to(torch.int64)
    for slot, (count, start) in enumerate(zip(counts, starts, strict=True)):
        if count == 0:
            continue
        ids = sorted_ids[start : start + count]
        first, last = int(ids[0]), int(ids[-1])
        # ids ascend within a slot (stable sort): consecutive exactly when they span count rows
        yield slot, ranks[slot], slice(first, last + 1) if last - first + 1 == count else ids


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision matmuls on CPU are slow or missing; CUDA's accumulate in float32 anyway.
    return t.dtype if t.is_cuda else torch.float32
