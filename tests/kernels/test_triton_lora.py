"""Triton LoRA kernels against the float64 oracle.

On CPU tensors the kernels run in Triton's interpreter (chosen per call, so this works
whatever imported Triton first and without TRITON_INTERPRET). The interpreter's `tl.dot` is
wrong for bf16 operands (Triton 3.9), so bf16 runs only in the `gpu` tests; a compile test
builds the GPU binaries for sm_80 and sm_90 without a GPU, bf16 included.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import lora, triton_lora
from loraplex.kernels.meta import LoraBatchMeta
from loraplex.kernels.op_count import OpCounter
from loraplex.kernels.triton_lora import ExpandConfig, ShrinkConfig

RANKS = (8, 0, 32, 4, 12, 16)  # mixed ranks, an empty slot, a rank that is no multiple of 8
ONE_SLICE, THREE_SLICES = (24,), (40, 8, 24)


def _shrink(config: ShrinkConfig | None = None):
    return lambda x, a, meta: triton_lora.lora_shrink(x, a, meta, config=config)


def _expand(config: ExpandConfig | None = None):
    return lambda y, b, meta, out, add: triton_lora.lora_expand(y, b, meta, out, add=add, config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("widths", [ONE_SLICE, THREE_SLICES], ids=["1slice", "3slices"])
@pytest.mark.parametrize("num_tokens", [1, 3, 17, 64])
def test_kernels_match_float64(lora_checks, num_tokens, widths, dtype):
    case = lora_checks.make_case(num_tokens, RANKS, widths, in_features=48, dtype=dtype, seed=num_tokens)
    lora_checks.check_shrink(_shrink(), case)
    lora_checks.check_expand(_expand(), case, add=True)
    lora_checks.check_expand(_expand(), case, add=False)


@pytest.mark.parametrize(
    ("in_features", "shrink_config", "expand_config"),
    [
        (64, ShrinkConfig(block_k=16, split_k=4), ExpandConfig(block_n=16)),  # even K, atomics
        (72, ShrinkConfig(block_k=16, split_k=2), ExpandConfig(block_n=32)),  # ragged last K block
        (40, ShrinkConfig(block_k=64, split_k=1), ExpandConfig(block_n=64)),  # K shorter than a block
    ],
)
def test_tilings_agree(lora_checks, in_features, shrink_config, expand_config):
    case = lora_checks.make_case(17, RANKS, THREE_SLICES, in_features=in_features, seed=in_features)
    lora_checks.check_shrink(_shrink(shrink_config), case)
    lora_checks.check_expand(_expand(expand_config), case, add=True)


@pytest.mark.parametrize("split_k", [1, 3])
def test_shrink_writes_every_specified_entry(lora_checks, monkeypatch, split_k):
    real_new_y = triton_lora._new_y

    def poisoned(shape, device, zeroed):
        y = real_new_y(shape, device, zeroed)
        return y if zeroed else y.fill_(float("nan"))  # only atomics may rely on zeros

    monkeypatch.setattr(triton_lora, "_new_y", poisoned)
    case = lora_checks.make_case(17, RANKS, THREE_SLICES, in_features=48, seed=5)
    lora_checks.check_shrink(_shrink(ShrinkConfig(block_k=16, split_k=split_k)), case)


def test_more_slices_than_one_launch_takes(lora_checks):
    case = lora_checks.make_case(9, RANKS, (16, 8, 24, 32, 8), in_features=32, seed=7)
    lora_checks.check_shrink(_shrink(), case)
    lora_checks.check_expand(_expand(), case, add=True)


def test_all_tokens_without_adapter(lora_checks):
    case = lora_checks.make_case(17, RANKS, THREE_SLICES, in_features=32, token_slots=[-1, 1] * 8 + [-1])
    assert case.meta.num_active.item() == 0
    lora_checks.check_shrink(_shrink(), case)
    lora_checks.check_expand(_expand(), case, add=True)
    lora_checks.check_expand(_expand(), case, add=False)


def test_one_token_among_many_unused_slots(lora_checks):
    case = lora_checks.make_case(1, (16,) * 7 + (64,), ONE_SLICE, in_features=32, token_slots=[7])
    lora_checks.check_shrink(_shrink(), case)
    lora_checks.check_expand(_expand(), case, add=True)


def test_strided_views_of_bigger_buffers(lora_checks):
    case = lora_checks.make_case(17, RANKS, THREE_SLICES, in_features=32, seed=11)
    meta = case.meta
    wide_x = torch.randn(17, 48)
    wide_x[:, 8:40] = case.x
    y = triton_lora.lora_shrink(wide_x[:, 8:40], case.a_slots, meta)
    specified = torch.arange(y.shape[2]) < torch.tensor([case.token_rank(t) for t in range(17)])[:, None]
    expected_y = lora.reference.lora_shrink(case.x, case.a_slots, meta)
    torch.testing.assert_close(torch.where(specified, y, 0.0), expected_y)
    wide_out = torch.randn(17, 96)
    before = wide_out.clone()
    ours = triton_lora.lora_expand(y, case.b_slots, meta, wide_out[:, 10:82])
    expected = lora.reference.lora_expand(y, case.b_slots, meta, before[:, 10:82].clone())
    torch.testing.assert_close(ours, expected)
    torch.testing.assert_close(wide_out[:, :10], before[:, :10])
    torch.testing.assert_close(wide_out[:, 82:], before[:, 82:])


def test_dispatch_runs_triton_on_cpu_when_forced(lora_checks, monkeypatch):
    monkeypatch.setenv(lora.BACKEND_ENV, "triton")
    case = lora_checks.make_case(3, RANKS, THREE_SLICES, in_features=32, seed=2)
    lora_checks.check_shrink(lora.lora_shrink, case)
    lora_checks.check_expand(lora.lora_expand, case, add=True)


def test_launcher_rejects_bad_layouts(lora_checks):
    case = lora_checks.make_case(3, RANKS, ONE_SLICE, in_features=32)
    meta = case.meta
    with pytest.raises(AssertionError, match="x rows"):
        triton_lora.lora_shrink(case.x.t().contiguous().t(), case.a_slots, meta)
    with pytest.raises(AssertionError, match="A slot buffers"):
        triton_lora.lora_shrink(case.x, [case.a_slots[0].transpose(1, 2).contiguous().transpose(1, 2)], meta)
    y = triton_lora.lora_shrink(case.x, case.a_slots, meta)
    out = torch.zeros(3, 24)
    with pytest.raises(AssertionError, match="y must be"):
        triton_lora.lora_expand(
            y.half().float()[:, :, :].transpose(1, 2).contiguous().transpose(1, 2), case.b_slots, meta, out
        )
    with pytest.raises(ValueError, match="B slice"):
        triton_lora.lora_expand(y, [case.b_slots[0].half()], meta, out)
    int64_meta = LoraBatchMeta(**{k: v.long() for k, v in vars(meta).items()})
    with pytest.raises(AssertionError, match="int32"):
        triton_lora.lora_shrink(case.x, case.a_slots, int64_meta)


def test_launch_shape_depends_on_batch_size_only():
    # one captured CUDA graph per batch size must serve every batch composition
    cpu = torch.device("cpu")
    shapes = {
        (
            triton_lora.shrink_config(32, 16, 2304, 16, 3, cpu),
            triton_lora.expand_config(32, 16, 4096, 16, cpu),
            meta.tile_slots.shape,
        )
        for meta in (
            LoraBatchMeta.build(torch.full((32,), -1), torch.full((16,), 16, dtype=torch.int32)),
            LoraBatchMeta.build(torch.arange(32) % 16, torch.full((16,), 16, dtype=torch.int32)),
            LoraBatchMeta.build(torch.zeros(32, dtype=torch.int64), torch.full((16,), 16, dtype=torch.int32)),
        )
    }
    assert len(shapes) == 1


@pytest.mark.parametrize("module", [triton_lora, lora.reference], ids=["triton", "reference"])
def test_empty_batch(lora_checks, module):
    case = lora_checks.make_case(0, RANKS, THREE_SLICES, in_features=32, token_slots=[])
    y = module.lora_shrink(case.x, case.a_slots, case.meta)
    assert y.shape == (3, 0, 32)
    out = torch.zeros(0, sum(THREE_SLICES))
    assert module.lora_expand(y, case.b_slots, case.meta, out) is out


@pytest.mark.parametrize("module", [triton_lora, lora.reference], ids=["triton", "reference"])
def test_shrink_accumulates_into_a_zeroed_workspace_without_a_fill(lora_checks, module):
    case = lora_checks.make_case(5, RANKS, THREE_SLICES, in_features=64, seed=6)
    meta = case.meta
    extra = {"config": ShrinkConfig(block_k=16, split_k=4)} if module is triton_lora else {}  # atomics
    workspace = torch.zeros(2, 3, 5, case.a_slots[0].shape[1])  # e.g. one row per LoRA op of a step
    with OpCounter() as counter:
        y = module.lora_shrink(case.x, case.a_slots, meta, out=workspace[1], **extra)
    assert y.data_ptr() == workspace[1].data_ptr()
    if module is triton_lora:
        assert counter.total.ops == {"triton:_shrink_kernel": 1}  # no zero-fill of its own
    lora_checks.check_shrink(
        lambda x, a, m: module.lora_shrink(x, a, m, out=torch.zeros_like(y), **extra), case
    )
    with pytest.raises(ValueError, match="out must be"):
        module.lora_shrink(case.x, case.a_slots, meta, out=torch.zeros(3, 5, 8))
