"""RMSNorm for the Llama family and Gemma."""

from __future__ import annotations

import torch
from torch import nn

from loraplex.kernels.fused import add_rmsnorm


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32.

    Gemma stores `w - 1` (zero-initialised weights) and multiplies before casting back
    (`offset=1.0`); Llama casts back first, then multiplies by `w`. Both orders are kept so
    half-precision outputs match the reference models bit for bit where they can.
    """

    def __init__(self, dim: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (xf * (self.offset + self.weight.float())).type_as(x)
        return self.weight * xf.type_as(x)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, backend: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual) in one fused op (`loraplex.kernels.fused.add_rmsnorm`)."""
        return add_rmsnorm(x, residual, self.weight, self.eps, self.offset, backend)
