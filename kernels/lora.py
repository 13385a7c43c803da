"""Public LoRA ops: `lora_shrink` and `lora_expand` for batches that mix adapters, and `lora_add`.

`lora_add` is the two in one call (out += LoRA(x)), what a layer runs: the Triton backend
launches the shrink and expand kernels through a float32 y, the reference backend keeps the
small products in its own layout (`loraplex.kernels.reference`).

`backend` ("triton" | "reference") is chosen once by the caller with
`loraplex.kernels.backend.choose_backend` and passed to every call. `backend=None` is the
old behaviour, kept until every caller passes it: the environment is read on each call
(`LORAPLEX_KERNELS`, `TRITON_INTERPRET`, see `choose_backend`).

y is float32 `[slices, T, max_rank]`: accumulation is float32 and the rank dimension is
tiny, so keeping y in float32 costs nothing and loses nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loraplex.kernels import reference
from loraplex.kernels.backend import BACKEND_ENV, check_backend, choose_backend
from loraplex.kernels.meta import LoraBatchMeta

__all__ = [
    "BACKEND_ENV",
    "LoraBatchMeta",
    "choose_backend",
    "kernel_backend",
    "lora_add",
    "lora_expand",
    "lora_shrink",
]

kernel_backend = choose_backend  # the old name


def _resolve(backend: str | None, device: torch.device) -> str:
    return choose_backend(device) if backend is None else check_backend(backend)


def lora_shrink(
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    backend: str | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """y[s, t, :r] = x[t] @ A_s[slot(t)][:r]^T as float32 [slices, T, max_rank].

    Rows of tokens without an adapter and columns >= the token's rank are unspecified.
    `out`: a contiguous float32 y that the caller has filled with zeros, returned filled. The
    Triton kernels split K across programs that add into y, so a fresh y costs a zero-fill
    launch per call; one workspace zeroed once per step for all layers saves those launches.
    """
    if _resolve(backend, x.device) == "triton":
        from loraplex.kernels import triton_lora  # Triton is imported only where it runs

        return triton_lora.lora_shrink(x, a_slots, meta, out=out)
    return reference.lora_shrink(x, a_slots, meta, out=out)


def lora_expand(
    y: torch.Tensor,
    b_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    out: torch.Tensor,
    add: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """out[t, off_s:off_s+out_s] (+)= y[s, t, :r] @ B_s[slot(t)][:, :r]^T in place; returns out.

    off_s are the cumulative widths in list order. Tokens without an adapter keep `out`
    when add=True and get zeros when add=False.
    """
    if _resolve(backend, out.device) == "triton":
        from loraplex.kernels import triton_lora

        return triton_lora.lora_expand(y, b_slots, meta, out, add=add)
    return reference.lora_expand(y, b_slots, meta, out, add=add)


def lora_add(
    x: torch.Tensor,
    a_slots: Sequence[torch.Tensor],
    b_slots: Sequence[torch.Tensor],
    meta: LoraBatchMeta,
    out: torch.Tensor,
    backend: str | None = None,
    y: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t, off_s:off_s+out_s] += (x[t] @ A_s[slot(t)][:r]^T) @ B_s[slot(t)][:, :r]^T; returns out.

    `y`: a zeroed float32 [slices, T, max_rank] workspace for the Triton shrink (see `lora_shrink`);
    the reference backend does not use one.
    """
    if _resolve(backend, out.device) == "triton":
        from loraplex.kernels import triton_lora

        shrunk = triton_lora.lora_shrink(x, a_slots, meta, out=y)
        return triton_lora.lora_expand(shrunk, b_slots, meta, out, add=True)
    return reference.lora_add(x, a_slots, b_slots, meta, out)
