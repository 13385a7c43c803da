"""Argument checks shared by both backends of `lora_shrink` and `lora_expand`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.kernels.meta import LoraBatchMeta

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_shrink(
    x: torch.Tensor, a_slots: Sequence[torch.Tensor], meta: LoraBatchMeta, out: torch.Tensor | None = None
) -> None:
    """x [T, in]; every A slice [S, max_rank, in] of x's dtype and device; out float32 [slices, T, max_rank]."""
    if x.dim() != 2:
        raise ValueError(f"x must be [tokens, in], got {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"x dtype {x.dtype} not in {FLOAT_DTYPES}")
    if x.shape[0] != meta.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens, meta has {meta.num_tokens}")
    if not a_slots:
        raise ValueError("a_slots is empty")
    expected = (meta.num_slots, a_slots[0].shape[1], x.shape[1])
    for a in a_slots:
        if tuple(a.shape) != expected:
            raise ValueError(f"A slice must be [slots, max_rank, in] = {expected}, got {tuple(a.shape)}")
        if a.dtype != x.dtype or a.device != x.device:
            raise ValueError(f"A slice is {a.dtype} on {a.device}, x is {x.dtype} on {x.device}")
    y_shape = (len(a_slots), x.shape[0], a_slots[0].shape[1])
    if out is not None and (
        tuple(out.shape) != y_shape
        or out.dtype != torch.float32
        or out.device != x.device
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"out must be a contiguous float32 {y_shape} on {x.device}, got {tuple(out.shape)} {out.dtype}"
        )


def check_expand(
    y: torch.Tensor, b_slots: Sequence[torch.Tensor], meta: LoraBatchMeta, out: torch.Tensor
) -> None:
    """y [slices, T, max_rank]; B slices [S, out_s, max_rank]; out [T, sum(out_s)] of B's dtype."""
    if not b_slots:
        raise ValueError("b_slots is empty")
    num_slices, num_tokens, max_rank = len(b_slots), meta.num_tokens, b_slots[0].shape[2]
    if tuple(y.shape) != (num_slices, num_tokens, max_rank):
        raise ValueError(f"y must be {(num_slices, num_tokens, max_rank)}, got {tuple(y.shape)}")
    check_b_slots(b_slots, meta, out, max_rank)
    if y.device != out.device:
        raise ValueError(f"y is on {y.device}, out on {out.device}")


def check_b_slots(
    b_slots: Sequence[torch.Tensor], meta: LoraBatchMeta, out: torch.Tensor, max_rank: int
) -> None:
    """B slices [S, out_s, max_rank] of out's dtype and device; out [T, sum(out_s)]."""
    if not b_slots:
        raise ValueError("b_slots is empty")
    num_tokens = meta.num_tokens
    if out.dim() != 2 or out.shape[0] != num_tokens:
        raise ValueError(f"out must be [{num_tokens}, sum(out_s)], got {tuple(out.shape)}")
    if out.dtype not in FLOAT_DTYPES:
        raise ValueError(f"out dtype {out.dtype} not in {FLOAT_DTYPES}")
    for b in b_slots:
        if b.dim() != 3 or b.shape[0] != meta.num_slots or b.shape[2] != max_rank:
            raise ValueError(f"B slice must be [{meta.num_slots}, out_s, {max_rank}], got {tuple(b.shape)}")
        if b.dtype != out.dtype or b.device != out.device:
            raise ValueError(f"B slice is {b.dtype} on {b.device}, out is {out.dtype} on {out.device}")
    width = sum(b.shape[1] for b in b_slots)
    if out.shape[1] != width:
        raise ValueError(f"out has {out.shape[1]} columns, the B slices {width}")
