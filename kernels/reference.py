"""Torch reference ops: the CPU path of the engine and the kernels' oracle.

Same signatures and contract as the Triton kernels. Tokens are taken slot by slot in the
order `LoraBatchMeta` sorted them, and never get a copy of A or B of their own:

- few active adapters, or skewed token counts (prefill, one adapter for the batch): one
  `[n, in] @ A^T` and one `[n, r] @ B^T` per active adapter and slice, A and B read in place;
  a slot whose tokens are consecutive in the batch works on views of x and out.
- many adapters with similar counts (decode): one batched matmul per slice over the active
  adapters, their A/B gathered once per adapter and their tokens padded to the largest count
  (at most `PAD_FACTOR` x the tokens), so the op count does not grow with the adapters.

Rows and columns beyond an adapter's rank are never used (stale data from a bigger adapter
that held the slot before cannot leak in). y is float32; rows of tokens without an adapter
and columns >= the token's rank are zero here (the contract leaves them unspecified).
The slot plan is read on the host (`tolist`): free on the CPU, a sync on an accelerator,
where the Triton kernels run instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels.meta import LoraBatchMeta
from loraplex.kernels.shapes import check_expand, check_shrink

PAD_FACTOR = 2  # batched path only while padding at most doubles the rows
MIN_BATCHED_SLOTS = 3  # below this a loop of matmuls launches no more ops than the gathers

Rows = slice | torch.Tensor  # consecutive token rows as a slice, others as an index tensor


@dataclass(frozen=True)
class _Padded:
    """Active slots' tokens as a padded [n, M] table (padding rows point at token 0, dropped)."""

    slots: torch.Tensor | slice  # int64 [n]; slice(None) when every slot is active (A, B as views)
    tokens: torch.Tensor  # int64 [n, M]
    valid: torch.Tensor  # int64 [n_valid] positions in the flattened [n * M] table that are real
    valid_tokens: torch.Tensor  # int64 [n_valid] their token rows
    rank: int  # the largest rank among the active slots: columns beyond it are never read
    past_rank: torch.Tensor | None  # bool [n, rank] column r >= the slot's rank; None: all equal


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
    plan = _plan(meta)
    if isinstance(plan, _Padded):
        xg = x[plan.tokens].to(compute)  # [n, M, in]
        for s, a in enumerate(a_slots):
            ag = _masked(a[plan.slots, : plan.rank].to(compute), plan, dim=1)  # [n, rank, in]
            yg = torch.bmm(xg, ag.transpose(1, 2)).flatten(0, 1)  # [n * M, rank]
            y[s, :, : plan.rank].index_copy_(0, plan.valid_tokens, yg[plan.valid].float())
        return y
    for slot, rank, rows in plan:
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
    plan = _plan(meta)
    if isinstance(plan, _Padded):
        return _expand_padded(y, b_slots, plan, out, add)
    compute = _compute_dtype(out)
    for slot, rank, rows in plan:
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


def _expand_padded(
    y: torch.Tensor, b_slots: Sequence[torch.Tensor], plan: _Padded, out: torch.Tensor, add: bool
) -> torch.Tensor:
    compute = _compute_dtype(out)
    block = out[plan.valid_tokens]  # [n_valid, sum(out_s)]
    offset = 0
    for s, b in enumerate(b_slots):
        width = b.shape[1]
        yg = _masked(y[s, :, : plan.rank][plan.tokens].to(compute), plan, dim=2)  # [n, M, rank]
        bg = _masked(b[plan.slots, :, : plan.rank].to(compute), plan, dim=2)  # [n, out_s, rank]
        delta = torch.bmm(yg, bg.transpose(1, 2)).flatten(0, 1)[plan.valid].float()  # [n_valid, out_s]
        cols = block[:, offset : offset + width]
        cols.copy_(cols.float() + delta if add else delta)
        offset += width
    return out.index_copy_(0, plan.valid_tokens, block)


def _plan(meta: LoraBatchMeta) -> _Padded | list[tuple[int, int, Rows]]:
    """How to run this batch: the padded table, or (slot, rank, token rows) per active slot."""
    counts, starts = meta.slot_counts.tolist(), meta.slot_starts.tolist()
    active = [s for s, count in enumerate(counts) if count]
    sorted_ids = meta.sorted_token_ids.to(torch.int64)
    most = max((counts[s] for s in active), default=0)
    if len(active) >= MIN_BATCHED_SLOTS and len(active) * most <= PAD_FACTOR * sum(counts):
        return _padded(meta, sorted_ids, active, most)
    ranks = meta.slot_ranks.tolist()
    groups = []
    for slot in active:
        ids = sorted_ids[starts[slot] : starts[slot] + counts[slot]]
        first, last = int(ids[0]), int(ids[-1])
        # ids ascend within a slot (stable sort): consecutive exactly when they span count rows
        groups.append(
            (slot, ranks[slot], slice(first, last + 1) if last - first + 1 == counts[slot] else ids)
        )
    return groups


def _padded(meta: LoraBatchMeta, sorted_ids: torch.Tensor, active: list[int], most: int) -> _Padded:
    device = sorted_ids.device
    slots = torch.tensor(active, dtype=torch.int64, device=device)
    counts, starts = meta.slot_counts.to(torch.int64)[slots], meta.slot_starts.to(torch.int64)[slots]
    offsets = torch.arange(most, device=device)
    is_valid = offsets[None, :] < counts[:, None]  # [n, M]
    positions = torch.where(is_valid, starts[:, None] + offsets[None, :], 0)
    tokens = torch.where(is_valid, sorted_ids[positions], 0)
    valid = is_valid.flatten().nonzero().squeeze(1)
    ranks = meta.slot_ranks.to(torch.int64)[slots]
    rank_list = ranks.tolist()
    rank, past_rank = max(rank_list), None
    if min(rank_list) < rank:  # a smaller adapter: its slot may hold stale rows beyond its rank
        past_rank = torch.arange(rank, device=device)[None, :] >= ranks[:, None]
    every = slice(None) if len(active) == meta.num_slots else slots
    return _Padded(every, tokens, valid, tokens.flatten()[valid], rank, past_rank)


def _masked(t: torch.Tensor, plan: _Padded, dim: int) -> torch.Tensor:
    """t [n, ..] with its rank axis `dim` zeroed beyond each slot's rank."""
    if plan.past_rank is None:
        return t
    mask = plan.past_rank[:, :, None] if dim == 1 else plan.past_rank[:, None, :]
    return t.masked_fill(mask, 0)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision matmuls on CPU are slow or missing; CUDA's accumulate in float32 anyway.
    return t.dtype if t.is_cuda else torch.float32
