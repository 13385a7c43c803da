"""Torch reference ops: the CPU path of the engine and the kernels' oracle.

`lora_shrink` / `lora_expand` have the signatures and contract of the Triton kernels.
`lora_add` is the two fused (out += LoRA(x)), the form the model runs on this backend: the
small [T, r] products stay in whatever layout suits the matmuls and are never written to y.

Tokens are taken slot by slot in the order `LoraBatchMeta` sorted them, and never get a copy
of A or B of their own. How a batch runs is planned once per meta on the host (`_plan`, kept
on the meta: every layer of a step, and every step of an unchanged decode batch, reuses it):

- one active adapter, many tokens per adapter (prefill), or skewed token counts: per active
  adapter and slice one `[n, in] @ A^T` and one `addmm_` of `[n, r] @ B^T` into out; a slot whose
  tokens are consecutive in the batch works on views of x and out.
- several adapters with similar counts (decode): per slice one batched matmul over the active
  adapters for the shrink and one for the expand, tokens padded to the largest count (at most
  `PAD_FACTOR` x the tokens), then one add of every slice's delta into out: in place on a
  view when the batch's adapter tokens are consecutive rows in slot order (a steady decode
  batch, prefill of whole prompts), else one `index_add_`. Consecutive active slots are read
  as a view of the slot buffers. (`baddbmm_` into strided views of out would save the add, but
  torch runs it as one `addmm_` per adapter.)

The slot buffers may be strided views (`LoraLinear` keeps B as a contiguous B^T on this
backend: the expand then streams B^T rows, twice as fast on the CPU as B's short rows).
Rows and columns beyond an adapter's rank are never used (stale data from a bigger adapter
that held the slot before cannot leak in). y is float32; rows of tokens without an adapter
and columns >= the token's rank are zero here (the contract leaves them unspecified).
The plan is read on the host (`tolist`): free on the CPU, a sync on an accelerator, where the
Triton kernels run instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from loraplex.kernels.meta import LoraBatchMeta
from loraplex.kernels.shapes import check_b_slots, check_expand, check_shrink

PAD_FACTOR = 2  # batched path only while padding at most doubles the rows
MIN_BATCHED_SLOTS = 2  # one active adapter: plain matmuls on views, nothing to batch
MAX_BATCHED_ROWS = 16  # more tokens per adapter (prefill): per-adapter matmuls into out beat the bmm

Rows = slice | torch.Tensor  # consecutive token rows as a slice, others as an index tensor


@dataclass(frozen=True)
class _Group:
    slot: int
    rank: int
    rows: Rows  # the slot's token rows


@dataclass(frozen=True)
class _Batched:
    """Active slots' tokens as an [n, M] table, slot by slot in slot order."""

    slots: slice | torch.Tensor  # the n active slots: a slice of the slot buffers when consecutive
    shape: tuple[int, int]  # (n, M)
    rows: slice | None  # the table is exactly these consecutive rows (no padding): views of x and out
    tokens: torch.Tensor | None  # int64 [n, M] token row of each entry (padding: row 0); None with rows
    padding: torch.Tensor | None  # bool [n, M, 1] padding entries (their x rows are zeroed)
    rank: int  # the largest rank among the active slots: columns beyond it are never read
    past_rank: torch.Tensor | None  # bool [n, rank] column r >= the slot's rank; None: all equal


@dataclass(frozen=True)
class _Plan:
    groups: tuple[_Group, ...]
    batched: _Batched | None  # None: run the groups
    views: dict = field(default_factory=dict, compare=False)  # per layer: its `_Views` (or None)


@dataclass(frozen=True)
class _Views:
    """One layer's slot buffers as this plan reads them: views only (weights loaded later are seen).

    Built once per plan and layer, after the argument checks (x and out of the same shapes and
    dtypes pass them every time). Holding the buffers keeps their ids, the cache key, theirs.
    """

    buffers: tuple[torch.Tensor, ...]
    shrink: tuple[tuple[torch.Tensor, ...], ...]  # per group (or the one batched run): [(n,) in, r] matrices
    expand: tuple[tuple[torch.Tensor, ...], ...]  # the same: per slice [(n,) r, out_s]
    widths: tuple[int, ...]
    stacked: bool  # one shrink for every slice: split its result


def lora_add(
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    b_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    out: torch.Tensor,
) -> torch.Tensor:
    """out[t, off_s:off_s+out_s] += (x[t] @ A_s[slot(t)][:r]^T) @ B_s[slot(t)][:, :r]^T, in place."""
    plan = _plan(meta)
    key = (x.shape, x.dtype, out.shape, out.dtype, out.is_contiguous(), *map(id, a_slots), *map(id, b_slots))
    views = plan.views.get(key, False)
    if views is False:
        check_shrink(x, a_slots, meta)
        check_b_slots(b_slots, meta, out, a_slots[0].shape[1])
        views = plan.views[key] = _views(plan, x, a_slots, b_slots, out)
    if views is not None:
        return _add_views(x, plan, views, out)
    return _add_generic(x, a_slots, b_slots, plan, out)


def _views(
    plan: _Plan,
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    b_slots: Sequence[torch.Tensor],
    out: torch.Tensor,
) -> _Views | None:
    """The cached views, or None where the plan needs copies (half precision on the CPU, gathered or masked slots)."""
    compute = _compute_dtype(out)
    if not x.dtype == out.dtype == compute or not out.is_contiguous():
        return None
    stacked, max_rank = _stacked(a_slots), a_slots[0].shape[1]
    batched = plan.batched
    if batched is not None and (isinstance(batched.slots, torch.Tensor) or batched.past_rank is not None):
        return None
    runs = [(batched.slots, batched.rank)] if batched is not None else [(g.slot, g.rank) for g in plan.groups]
    fused = stacked is not None and all(rank == max_rank for _, rank in runs)
    shrink, expand = [], []
    for slots, rank in runs:
        if fused:
            shrink.append((stacked[slots].transpose(-1, -2),))
        else:
            shrink.append(tuple(a[slots, :rank].transpose(-1, -2) for a in a_slots))
        expand.append(tuple(b[slots, :, :rank].transpose(-1, -2) for b in b_slots))
    widths = tuple(b.shape[1] for b in b_slots)
    return _Views((*a_slots, *b_slots), tuple(shrink), tuple(expand), widths, fused)


def _add_views(x: torch.Tensor, plan: _Plan, views: _Views, out: torch.Tensor) -> torch.Tensor:
    num_slices = len(views.widths)
    if plan.batched is not None:
        return _add_batched_views(x, plan.batched, views, out)
    for group, shrink, expand in zip(plan.groups, views.shrink, views.expand, strict=True):
        whole = group.rows == slice(0, x.shape[0])
        xs, block = (x, out) if whole else (x[group.rows], out[group.rows])
        ys = _split(xs @ shrink[0], num_slices) if views.stacked else [xs @ w for w in shrink]
        offset = 0
        for y, bt, width in zip(ys, expand, views.widths, strict=True):
            block[:, offset : offset + width].addmm_(y, bt)
            offset += width
        if not isinstance(group.rows, slice):
            out.index_copy_(0, group.rows, block)
    return out


def _add_batched_views(x: torch.Tensor, plan: _Batched, views: _Views, out: torch.Tensor) -> torch.Tensor:
    xg = _gather(x, plan)  # [n, M, in]
    shrink = views.shrink[0]
    ys = (
        _split(torch.bmm(xg, shrink[0]), len(views.widths))
        if views.stacked
        else [torch.bmm(xg, w) for w in shrink]
    )
    deltas = [torch.bmm(y, bt) for y, bt in zip(ys, views.expand[0], strict=True)]  # [n, M, out_s]
    return _scatter(deltas, plan, out)


def _scatter(deltas: list[torch.Tensor], plan: _Batched, out: torch.Tensor) -> torch.Tensor:
    """Add the slices' [n, M, out_s] deltas into their token rows of out."""
    delta = deltas[0] if len(deltas) == 1 else torch.cat(deltas, dim=2)
    if plan.rows is not None:
        out[plan.rows].view(delta.shape).add_(delta)
    else:
        out.index_add_(0, plan.tokens.flatten(), delta.flatten(0, 1))
    return out


def _gather(x: torch.Tensor, plan: _Batched) -> torch.Tensor:
    """x's rows as the [n, M, in] table (a view for consecutive rows; padding rows zero)."""
    n, m = plan.shape
    if plan.rows is not None:
        return x[plan.rows].reshape(n, m, -1)
    xg = x[plan.tokens]
    if plan.padding is not None:
        xg.masked_fill_(plan.padding, 0)  # padding rows add exact zeros to row 0
    return xg


def _add_generic(
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    b_slots: Sequence[torch.Tensor],
    plan: _Plan,
    out: torch.Tensor,
) -> torch.Tensor:
    """Any dtype and layout; copies the slot rows the plan reads where it has to."""
    compute = _compute_dtype(out)
    stacked = _stacked(a_slots)
    if plan.batched is not None and x.dtype == out.dtype == compute and out.is_contiguous():
        return _add_batched(x, a_slots, b_slots, plan.batched, out, stacked)
    for group in plan.groups:
        xs = x[group.rows].to(compute)
        if stacked is not None and group.rank == stacked.shape[1] // len(a_slots):
            ys = _split(xs @ stacked[group.slot].to(compute).T, len(a_slots))  # every slice in one matmul
        else:
            ys = [xs @ a[group.slot, : group.rank].to(compute).T for a in a_slots]
        _expand_rows(ys, b_slots, group, out)
    return out


def _stacked(a_slots: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """[S, slices * R, in] when the A slices are consecutive views of one buffer (the layer's layout)."""
    first = a_slots[0]
    if len(a_slots) == 1:
        return None
    num_slots, max_rank, in_features = first.shape
    step = max_rank * in_features
    stride = (len(a_slots) * step, in_features, 1)
    ptr, size = first.data_ptr(), first.element_size()
    for s, a in enumerate(a_slots):
        if a.stride() != stride or a.data_ptr() != ptr + s * step * size:
            return None
    return first.as_strided((num_slots, len(a_slots) * max_rank, in_features), stride)


def _split(y: torch.Tensor, num_slices: int) -> list[torch.Tensor]:
    """Per-slice column blocks of a stacked shrink's [.., slices * R] result (views)."""
    return list(y.chunk(num_slices, dim=-1))


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
    for group in _plan(meta).groups:
        xs = x[group.rows].to(compute)  # [n, in]
        for s, a in enumerate(a_slots):
            y[s, group.rows, : group.rank] = (xs @ a[group.slot, : group.rank].to(compute).T).float()
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
    for group in _plan(meta).groups:
        ys = [y[s, group.rows, : group.rank].to(compute) for s in range(len(b_slots))]
        _expand_rows(ys, b_slots, group, out)
    return out


def _expand_rows(
    ys: Sequence[torch.Tensor], b_slots: Sequence[torch.Tensor], group: _Group, out: torch.Tensor
) -> None:
    """out[rows, slice s] += ys[s] @ B_s[slot][:, :r]^T, accumulated in the compute dtype."""
    compute = _compute_dtype(out)
    block = out[group.rows]  # a view for consecutive rows, else a copy written back below
    offset = 0
    for y, b in zip(ys, b_slots, strict=True):
        width = b.shape[1]
        cols = block[:, offset : offset + width]
        bt = b[group.slot, :, : group.rank].T.to(compute)  # [r, out_s]: contiguous for a B^T buffer
        if cols.dtype == compute:
            cols.addmm_(y, bt)
        else:  # half precision on the CPU: add in float32, round once
            cols.copy_(cols.float() + y @ bt)
        offset += width
    if not isinstance(group.rows, slice):
        out.index_copy_(0, group.rows, block)


def _add_batched(
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    b_slots: Sequence[torch.Tensor],
    plan: _Batched,
    out: torch.Tensor,
    stacked: torch.Tensor | None,
) -> torch.Tensor:
    xg = _gather(x, plan)  # [n, M, in]
    if stacked is not None and plan.rank == a_slots[0].shape[1]:  # every slice in one bmm
        ys = _split(torch.bmm(xg, stacked[plan.slots].transpose(1, 2)), len(a_slots))
    else:
        ys = [torch.bmm(xg, a[plan.slots, : plan.rank].transpose(1, 2)) for a in a_slots]  # [n, M, rank]
    deltas = []
    for y, b in zip(ys, b_slots, strict=True):
        bt = b[plan.slots, :, : plan.rank].transpose(1, 2)  # [n, rank, out_s]
        if plan.past_rank is not None:  # a smaller adapter: its slot may hold stale rows beyond its rank
            y.masked_fill_(plan.past_rank[:, None, :], 0)
            bt = bt.masked_fill(plan.past_rank[:, :, None], 0)
        deltas.append(torch.bmm(y, bt))  # [n, M, out_s]
    return _scatter(deltas, plan, out)


def _plan(meta: LoraBatchMeta) -> _Plan:
    """How to run this batch, built once per meta (the meta's tensors never change after build)."""
    return meta.cached("reference_plan", lambda: _build_plan(meta))


def _build_plan(meta: LoraBatchMeta) -> _Plan:
    counts, starts = meta.slot_counts.tolist(), meta.slot_starts.tolist()
    ranks = meta.slot_ranks.tolist()
    active = [s for s, count in enumerate(counts) if count]
    num_valid = sum(counts)
    ids = meta.sorted_token_ids[:num_valid].tolist()
    device = meta.device
    groups = []
    for slot in active:
        own = ids[starts[slot] : starts[slot] + counts[slot]]
        # ids ascend within a slot (stable sort): consecutive exactly when they span count rows
        rows = (
            slice(own[0], own[-1] + 1)
            if own[-1] - own[0] + 1 == len(own)
            else torch.tensor(own, dtype=torch.int64, device=device)
        )
        groups.append(_Group(slot, ranks[slot], rows))
    most = max((counts[s] for s in active), default=0)
    batched = None
    if (
        len(active) >= MIN_BATCHED_SLOTS
        and most <= MAX_BATCHED_ROWS
        and len(active) * most <= PAD_FACTOR * num_valid
    ):
        batched = _batched(active, counts, starts, ranks, ids, most, device)
    return _Plan(tuple(groups), batched)


def _batched(
    active: list[int],
    counts: list[int],
    starts: list[int],
    ranks: list[int],
    ids: list[int],
    most: int,
    device: torch.device,
) -> _Batched:
    n = len(active)
    first, last = active[0], active[-1]
    slots = (
        slice(first, last + 1)
        if last - first + 1 == n
        else torch.tensor(active, dtype=torch.int64, device=device)
    )
    rank = max(ranks[s] for s in active)
    past_rank = None
    if any(ranks[s] < rank for s in active):
        slot_ranks = torch.tensor([ranks[s] for s in active], device=device)
        past_rank = torch.arange(rank, device=device)[None, :] >= slot_ranks[:, None]
    padded = any(counts[s] < most for s in active)
    if not padded and ids == list(range(ids[0], ids[0] + len(ids))):
        return _Batched(slots, (n, most), slice(ids[0], ids[0] + len(ids)), None, None, rank, past_rank)
    table = [ids[starts[s] : starts[s] + counts[s]] + [0] * (most - counts[s]) for s in active]
    tokens = torch.tensor(table, dtype=torch.int64, device=device)
    padding = None
    if padded:
        is_pad = [[j >= counts[s] for j in range(most)] for s in active]
        padding = torch.tensor(is_pad, dtype=torch.bool, device=device)[:, :, None]
    return _Batched(slots, (n, most), None, tokens, padding, rank, past_rank)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    # Half-precision matmuls on CPU are slow or missing; CUDA's accumulate in float32 anyway.
    return t.dtype if t.is_cuda else torch.float32
