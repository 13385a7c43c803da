"""Fused add+RMSNorm, RoPE+KV write and act*up: Triton (interpreter) against the reference ops,
and the reference ops against the model layers they replace (bit for bit).

Triton 3.9's interpreter rounds float32 -> bfloat16 toward zero (a GPU rounds to nearest),
so bfloat16 results are compared within the error of three such roundings (3 * 2**-7).
"""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import fused
from loraplex.server.layers.attention import store_kv
from loraplex.server.layers.norm import RMSNorm
from loraplex.server.layers.rotary import apply_rotary
from loraplex.server.models.llama import ACTIVATIONS as MODEL_ACTIVATIONS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float32: summation order and libm differences; float16: one ulp of the output
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (2.4e-2, 2.4e-2)}
MODEL_ACTIVATION_NAMES = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def _close(got: torch.Tensor, expected: torch.Tensor) -> None:
    rtol, atol = TOLERANCE[expected.dtype]
    assert got.dtype == expected.dtype and got.shape == expected.shape
    torch.testing.assert_close(got.float(), expected.float(), rtol=rtol, atol=atol)


def _randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- add_rmsnorm -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add_norm"])
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 64), (7, 37), (3, 1100)])
def test_add_rmsnorm_triton_matches_reference(dtype, offset, with_residual, tokens, hidden):
    x = _randn(tokens, hidden, dtype=dtype, seed=hidden) * 3
    residual = _randn(tokens, hidden, dtype=dtype, seed=hidden + 1) if with_residual else None
    weight = _randn(hidden, dtype=dtype, seed=2) * 0.1 + (0.0 if offset else 1.0)
    expected_norm, expected_res = fused.add_rmsnorm(x, residual, weight, 1e-6, offset, "reference")
    normed, new_residual = fused.add_rmsnorm(x, residual, weight, 1e-6, offset, "triton")
    _close(normed, expected_norm)
    if residual is None:
        assert new_residual is x
    else:
        _close(new_residual, expected_res)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0], ids=["llama", "gemma"])
def test_add_rmsnorm_reference_is_the_model_norm(dtype, offset):
    norm = RMSNorm(48, eps=1e-5, offset=offset).to(dtype)
    norm.weight.data.copy_(_randn(48, dtype=dtype, seed=3))
    x, residual = _randn(5, 48, dtype=dtype, seed=4), _randn(5, 48, dtype=dtype, seed=5)
    normed, new_residual = fused.add_rmsnorm(x, residual, norm.weight, 1e-5, offset, "reference")
    assert torch.equal(new_residual, x + residual)
    assert torch.equal(normed, norm(x + residual))


def test_add_rmsnorm_reads_rows_through_their_stride():
    wide = _randn(4, 80, dtype=torch.float32, seed=6)
    x, residual, weight = wide[:, 8:40], wide[:, 40:72], _randn(32, dtype=torch.float32, seed=7)
    expected = fused.add_rmsnorm(x.contiguous(), residual.contiguous(), weight, 1e-6, 0.0, "reference")
    got = fused.add_rmsnorm(x, residual, weight, 1e-6, 0.0, "triton")
    _close(got[0], expected[0])
    _close(got[1], expected[1])


# --- rope_kv_write -----------------------------------------------------------------------------


def _rope_case(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, seed: int):
    """q, k, v as views of one fused qkv output (as the model splits it), random positions."""
    qkv = _randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=seed)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 4096, (tokens,), generator=gen)
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    return (
        q.view(tokens, heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
        positions,
        inv_freq,
    )


def _poisoned_cache(num_blocks: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
    shape = (num_blocks, block_size, kv_heads, head_dim)
    return torch.full(shape, float("nan"), dtype=dtype), torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim"), [(4, 2, 16), (3, 1, 10), (2, 2, 64)], ids=["gqa", "odd", "mha"]
)
@pytest.mark.parametrize("scaling", [1.0, 0.75])
def test_rope_kv_write_triton_matches_reference(dtype, heads, kv_heads, head_dim, scaling):
    tokens, block_size = 6, 4
    q, k, v, positions, inv_freq = _rope_case(tokens, heads, kv_heads, head_dim, dtype, seed=head_dim)
    slots = torch.tensor([5, -1, 0, 13, -1, 2], dtype=torch.int32)  # two padding rows
    results = []
    for backend in ("reference", "triton"):
        k_cache, v_cache = _poisoned_cache(4, block_size, kv_heads, head_dim, dtype)
        q_rot, k_rot = fused.rope_kv_write(
            q, k, v, positions, inv_freq, scaling, k_cache, v_cache, slots, backend
        )
        results.append((q_rot, k_rot, k_cache, v_cache))
    (q_ref, k_ref, kc_ref, vc_ref), (q_rot, k_rot, k_cache, v_cache) = results
    _close(q_rot, q_ref)
    _close(k_rot, k_ref)
    written = torch.zeros(16, dtype=torch.bool)
    written[[5, 0, 13, 2]] = True
    flat = (k_cache.view(16, -1), v_cache.view(16, -1), kc_ref.view(16, -1), vc_ref.view(16, -1))
    assert all(bool(t[~written].isnan().all()) for t in flat)  # padding rows stored nowhere
    _close(flat[0][written], flat[2][written])
    assert torch.equal(flat[1][written], flat[3][written])  # v is copied, not computed


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_kv_write_reference_is_the_model_rotary_and_store(dtype):
    q, k, v, positions, inv_freq = _rope_case(5, 4, 2, 16, dtype, seed=8)
    slots = torch.tensor([3, 9, 1, 30, 17])
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = (emb.cos() * 0.5).to(dtype), (emb.sin() * 0.5).to(dtype)  # RotaryEmbedding.forward
    k_model, v_model = _poisoned_cache(4, 8, 2, 16, dtype)
    store_kv(k_model, v_model, apply_rotary(k, cos, sin), v, slots)
    k_cache, v_cache = _poisoned_cache(4, 8, 2, 16, dtype)
    q_rot, k_rot = fused.rope_kv_write(
        q, k, v, positions, inv_freq, 0.5, k_cache, v_cache, slots, "reference"
    )
    assert torch.equal(q_rot, apply_rotary(q, cos, sin))
    assert torch.equal(k_rot, apply_rotary(k, cos, sin))
    assert torch.equal(k_cache.nan_to_num(7.0), k_model.nan_to_num(7.0))
    assert torch.equal(v_cache.nan_to_num(7.0), v_model.nan_to_num(7.0))


def test_rope_kv_write_checks_its_arguments():
    q, k, v, positions, inv_freq = _rope_case(3, 4, 2, 16, torch.float32, seed=9)
    k_cache, v_cache = _poisoned_cache(2, 4, 2, 16, torch.float32)
    slots = torch.tensor([0, 1, 2])
    args = (positions, inv_freq, 1.0, k_cache, v_cache, slots)
    with pytest.raises(ValueError, match="backend"):
        fused.rope_kv_write(q, k, v, *args, "cuda")
    with pytest.raises(ValueError, match="k_cache"):
        fused.rope_kv_write(q, k, v, positions, inv_freq, 1.0, k_cache[..., :8], v_cache, slots, "triton")
    with pytest.raises(ValueError, match="inv_freq"):
        fused.rope_kv_write(q, k, v, positions, inv_freq.double(), 1.0, k_cache, v_cache, slots, "triton")
    with pytest.raises(ValueError, match="slot_mapping"):
        fused.rope_kv_write(q, k, v, positions, inv_freq, 1.0, k_cache, v_cache, slots[:2], "triton")
    strided_heads = torch.randn(3, 16, 4).transpose(1, 2)  # [3, 4, 16] whose rows are not packed
    with pytest.raises(AssertionError, match="packed"):
        fused.rope_kv_write(strided_heads, k, v, *args, "triton")


# --- act_mul ------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # numpy saturating
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", sorted(fused.ACTIVATIONS))
@pytest.mark.parametrize(("tokens", "inter"), [(1, 16), (5, 50), (2, 1500)])
def test_act_mul_triton_matches_reference(dtype, activation, tokens, inter):
    gate_up = _randn(tokens, 2 * inter, dtype=dtype, seed=inter) * 4
    gate_up[0, :4] = torch.tensor([-60.0, 60.0, -9.0, 0.0], dtype=dtype)  # saturation, no NaN
    expected = fused.act_mul(gate_up, activation, "reference")
    got = fused.act_mul(gate_up, activation, "triton")
    assert bool(got.isfinite().all())
    _close(got, expected)


@pytest.mark.parametrize("activation", sorted(fused.ACTIVATIONS))
def test_act_mul_reference_is_the_model_mlp(activation):
    gate_up = _randn(3, 2 * 24, dtype=torch.float16, seed=10)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = MODEL_ACTIVATIONS[MODEL_ACTIVATION_NAMES[activation]](gate) * up
    assert torch.equal(fused.act_mul(gate_up, activation, "reference"), expected)


def test_act_mul_checks_its_arguments():
    gate_up = torch.randn(2, 8)
    with pytest.raises(ValueError, match="activation"):
        fused.act_mul(gate_up, "relu", "triton")
    with pytest.raises(ValueError, match="even"):
        fused.act_mul(torch.randn(2, 7), "silu", "triton")
    with pytest.raises(AssertionError, match="contiguous"):
        fused.act_mul(gate_up.t().contiguous().t(), "silu", "triton")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_empty_batches(backend):
    x, weight = torch.zeros(0, 16), torch.ones(16)
    assert fused.add_rmsnorm(x, x, weight, 1e-6, 0.0, backend)[0].shape == (0, 16)
    assert fused.act_mul(torch.zeros(0, 32), "silu", backend).shape == (0, 16)
    q, k, v, positions, inv_freq = _rope_case(0, 2, 1, 8, torch.float32, seed=11)
    k_cache, v_cache = _poisoned_cache(1, 4, 1, 8, torch.float32)
    q_rot, k_rot = fused.rope_kv_write(
        q, k, v, positions, inv_freq, 1.0, k_cache, v_cache, torch.zeros(0, dtype=torch.long), backend
    )
    assert q_rot.shape == (0, 2, 8) and k_rot.shape == (0, 1, 8)
    assert bool(k_cache.isnan().all())
