"""RMSNorm against transformers' Llama and Gemma2 norms, in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from loraplex.server.layers.norm import RMSNorm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("reference_cls", "offset"), [(LlamaRMSNorm, 0.0), (Gemma2RMSNorm, 1.0)])
def test_matches_transformers(reference_cls, offset: float, dtype: torch.dtype) -> None:
    weight = torch.randn(32)
    reference = reference_cls(32, eps=1e-6).to(dtype)
    norm = RMSNorm(32, eps=1e-6, offset=offset).to(dtype)
    with torch.no_grad():
        reference.weight.copy_(weight)
        norm.weight.copy_(weight)
    x = (torch.randn(5, 32) * 3).to(dtype)
    assert torch.equal(norm(x), reference(x))
