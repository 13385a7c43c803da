"""The fused kernels on a real GPU at Gemma-2-2B and Mistral-7B widths: against the torch ops on
the same device (the GPU rounds float32 -> bfloat16 to nearest, so one ulp bounds every dtype),
and inside a captured CUDA graph."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ULP = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
LAYOUTS = {  # hidden, intermediate, heads, kv heads, head_dim
    "gemma-2-2b": (2304, 9216, 8, 4, 256),
    "mistral-7b": (4096, 14336, 32, 8, 128),
}


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    tol = ULP[expected.dtype]
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_fused_ops_match_torch_on_gpu(layout, dtype):
    hidden, inter, heads, kv_heads, head_dim = LAYOUTS[layout]
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    x, residual, weight = randn(32, hidden), randn(32, hidden), randn(hidden) * 0.1
    for offset in (0.0, 1.0):
        ours = fused.add_rmsnorm(x, residual, weight, 1e-6, offset, "triton")
        torch_ops = fused.add_rmsnorm(x, residual, weight, 1e-6, offset, "reference")
        _close(ours[0], torch_ops[0])
        assert torch.equal(ours[1], torch_ops[1])
    gate_up = randn(32, 2 * inter) * 3
    for activation in sorted(fused.ACTIVATIONS):
        _close(fused.act_mul(gate_up, activation, "triton"), fused.act_mul(gate_up, activation, "reference"))
    qkv = randn(32, (heads + 2 * kv_heads) * head_dim)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    q, k, v = q.view(32, heads, head_dim), k.view(32, kv_heads, head_dim), v.view(32, kv_heads, head_dim)
    positions = torch.randint(0, 8192, (32,), device="cuda", generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, device="cuda").float() / head_dim))
    slots = torch.randperm(64 * 16, device="cuda", generator=gen)[:32]
    slots[5] = -1
    results = []
    for backend in ("triton", "reference"):
        caches = [torch.zeros(64, 16, kv_heads, head_dim, device="cuda", dtype=dtype) for _ in range(2)]
        results.append(
            (*fused.rope_kv_write(q, k, v, positions, inv_freq, 1.0, *caches, slots, backend), *caches)
        )
    for ours, torch_ops in zip(*results, strict=True):
        _close(ours, torch_ops)


def test_fused_ops_replay_in_a_cuda_graph():
    x, weight = torch.randn(8, 2304, device="cuda"), torch.randn(2304, device="cuda")
    gate_up = torch.randn(8, 2 * 9216, device="cuda")
    for _ in range(2):  # compile and warm up outside the capture
        fused.add_rmsnorm(x, x, weight, 1e-6, 1.0, "triton"), fused.act_mul(gate_up, "gelu_tanh", "triton")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        normed, _ = fused.add_rmsnorm(x, x, weight, 1e-6, 1.0, "triton")
        act = fused.act_mul(gate_up, "gelu_tanh", "triton")
    x.copy_(torch.randn_like(x))
    gate_up.copy_(torch.randn_like(gate_up))
    graph.replay()
    torch.cuda.synchronize()
    _close(normed, fused.add_rmsnorm(x, x, weight, 1e-6, 1.0, "reference")[0])
    _close(act, fused.act_mul(gate_up, "gelu_tanh", "reference"))
