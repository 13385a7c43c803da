"""Public LoRA ops: `lora_shrink` and `lora_expand` for batches that mix adapters.

Backend per call: Triton for CUDA tensors, the torch reference for CPU tensors.
`LORAPLEX_KERNELS=triton|reference` forces one (`auto`, the default, picks as above);
with `TRITON_INTERPRET=1`, `auto` also runs the Triton kernels on CPU tensors (Triton's
interpreter, for tests). y is float32 `[slices, T, max_rank]`: accumulation is float32 and the
rank dimension is tiny, so keeping y in float32 costs nothing and loses nothing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from loraplex.kernels import reference
from loraplex.kernels.meta import LoraBatchMeta

__all__ = ["BACKEND_ENV", "LoraBatchMeta", "kernel_backend", "lora_expand", "lora_shrink"]

BACKEND_ENV = "LORAPLEX_KERNELS"
_BACKENDS = ("auto", "triton", "reference")


def kernel_backend(device: torch.device) -> str:
    """'triton' or 'reference' for tensors on `device`, honouring LORAPLEX_KERNELS."""
    forced = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if forced not in _BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {_BACKENDS}")
    if forced != "auto":
        return forced
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "reference"


def lora_shrink(x: torch.Tensor, a_slots: Sequence[torch.Tensor], meta: LoraBatchMeta) -> torch.Tensor:
    """y[s, t, :r] = x[t] @ A_s[slot(t)][:r]^T as float32 [slices, T, max_rank].

    Rows of tokens without an adapter and columns >= the token's rank are unspecified.
    """
    if kernel_backend(x.device) == "triton":
        from loraplex.kernels import triton_lora  # Triton is imported only where it runs

        return triton_lora.lora_shrink(x, a_slots, meta)
    return reference.lora_shrink(x, a_slots, meta)


def lora_expand(
    y: torch.Tensor,
    b_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    out: torch.Tensor,
    add: bool = True,
) -> torch.Tensor:
    """out[t, off_s:off_s+out_s] (+)= y[s, t, :r] @ B_s[slot(t)][:, :r]^T in place; returns out.

    off_s are the cumulative widths in list order. Tokens without an adapter keep `out`
    when add=True and get zeros when add=False.
    """
    if kernel_backend(out.device) == "triton":
        from loraplex.kernels import triton_lora

        return triton_lora.lora_expand(y, b_slots, meta, out, add=add)
    return reference.lora_expand(y, b_slots, meta, out, add=add)
