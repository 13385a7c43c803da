"""The torch reference ops against the float64 oracle (the CPU path of the engine)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from loraplex.kernels import reference
from loraplex.kernels.meta import LoraBatchMeta

RANKS = (8, 0, 16, 4, 16)  # mixed ranks and an empty slot
SHAPES = [(1, (24,)), (3, (32, 16, 16)), (17, (24,)), (64, (40, 8, 24))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("num_tokens", "widths"), SHAPES)
def test_shrink_then_expand_match_float64(lora_checks, num_tokens, widths, dtype):
    case = lora_checks.make_case(num_tokens, RANKS, widths, in_features=48, dtype=dtype, seed=num_tokens)
    lora_checks.check_shrink(reference.lora_shrink, case)
    lora_checks.check_expand(reference.lora_expand, case, add=True)
    lora_checks.check_expand(reference.lora_expand, case, add=False)


def test_all_tokens_without_adapter_leave_out_alone(lora_checks):
    case = lora_checks.make_case(5, RANKS, (16, 8), in_features=32, token_slots=[-1] * 5)
    lora_checks.check_expand(reference.lora_expand, case, add=True)
    lora_checks.check_expand(reference.lora_expand, case, add=False)


@pytest.mark.parametrize(
    "token_slots",
    [[2] * 9, [0, 0, 0, 2, 2, -1, 4, 4, 4], [2, 0, 2, 4, 0, 2, -1, 4, 2]],
    ids=["one_adapter", "consecutive_runs", "interleaved"],
)
@pytest.mark.parametrize("strategy", ["per_adapter", "batched"])
def test_consecutive_and_interleaved_tokens_match_float64(lora_checks, token_slots, strategy, monkeypatch):
    # per adapter: consecutive tokens on views, interleaved ones on gathered rows; batched: padded bmm
    if strategy == "per_adapter":
        monkeypatch.setattr(reference, "MIN_BATCHED_SLOTS", 10**6)
    else:
        monkeypatch.setattr(reference, "MIN_BATCHED_SLOTS", 1)
        monkeypatch.setattr(reference, "PAD_FACTOR", 10**6)
        monkeypatch.setattr(reference, "MAX_BATCHED_ROWS", 10**6)
    case = lora_checks.make_case(9, RANKS, (16, 8), in_features=32, seed=3, token_slots=token_slots)
    lora_checks.check_shrink(reference.lora_shrink, case)
    lora_checks.check_expand(reference.lora_expand, case, add=True)
    lora_checks.check_expand(reference.lora_expand, case, add=False)


def test_adapter_weights_are_never_copied_per_token(lora_checks, monkeypatch):
    """No tensor the ops create is bigger than the activations: A and B are read in place."""
    num_tokens, width, in_features = 256, 64, 64
    case = lora_checks.make_case(num_tokens, RANKS, (width,), in_features=in_features, seed=4)
    meta, out = case.meta, torch.zeros(num_tokens, width)
    with _LargestOutput() as largest:
        reference.lora_expand(reference.lora_shrink(case.x, case.a_slots, meta), case.b_slots, meta, out)
    assert 0 < largest.numel <= num_tokens * max(width, in_features)  # a per-token copy of A: x 16
    for strategy in ("per_adapter", "batched"):
        if strategy == "batched":
            monkeypatch.setattr(reference, "PAD_FACTOR", 10**6)
            monkeypatch.setattr(reference, "MAX_BATCHED_ROWS", 10**6)
        with _LargestOutput() as largest:
            reference.lora_add(case.x, case.a_slots, case.b_slots, case.meta, out)
        assert 0 < largest.numel <= num_tokens * max(width, in_features)


def test_shape_and_dtype_mismatches_are_rejected(lora_checks):
    case = lora_checks.make_case(3, (4, 4), (8,), in_features=16)
    meta = case.meta
    with pytest.raises(ValueError, match="A slice"):
        reference.lora_shrink(case.x, [case.a_slots[0].half()], meta)
    with pytest.raises(ValueError, match="tokens"):
        reference.lora_shrink(case.x[:2], case.a_slots, meta)
    y = reference.lora_shrink(case.x, case.a_slots, meta)
    with pytest.raises(ValueError, match="columns"):
        reference.lora_expand(y, case.b_slots, meta, torch.zeros(3, 9))
    with pytest.raises(ValueError, match="y must be"):
        reference.lora_expand(y[:, :2], case.b_slots, meta, torch.zeros(3, 8))
    other = LoraBatchMeta.build(case.token_slots, torch.tensor([4, 4, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match="slots"):
        reference.lora_shrink(case.x, case.a_slots, other)


class _LargestOutput(TorchDispatchMode):
    """Numel of the largest tensor any aten op returns while active."""

    numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        self.numel = max(self.numel, *sizes, 0)
        return out


@pytest.mark.parametrize("ranks", [(8, 16, 4), (16, 16, 16)], ids=["mixed_ranks", "equal_ranks"])
def test_every_slot_active_reads_the_slot_buffers_in_place(lora_checks, ranks):
    case = lora_checks.make_case(
        7, ranks, (16, 8), in_features=32, seed=5, token_slots=[2, 0, 1, 1, 0, 2, -1]
    )
    lora_checks.check_shrink(reference.lora_shrink, case)
    lora_checks.check_expand(reference.lora_expand, case, add=True)
    lora_checks.check_expand(reference.lora_expand, case, add=False)


def _check_add(lora_checks, case, b_slots=None) -> None:
    """lora_add into a poisoned out: adapter rows get out + B(A x) (float64 oracle), the rest keep their bits."""
    b_slots = case.b_slots if b_slots is None else b_slots
    width = sum(b.shape[1] for b in b_slots)
    rows = case.has_adapter()
    start = torch.randn(case.x.shape[0], width, generator=torch.Generator().manual_seed(7))
    start[~rows] = float("nan")
    out = start.to(case.x.dtype)
    before = out.clone()
    assert reference.lora_add(case.x, case.a_slots, b_slots, case.meta, out) is out
    expected = case.expected_delta(case.expected_y()) + before.double()
    tolerance = 1e-5 if case.x.dtype == torch.float32 else 1e-2
    assert lora_checks.rel_error(out[rows], expected[rows]) < tolerance
    bits = torch.int16 if out.element_size() == 2 else torch.int32
    assert torch.equal(out[~rows].view(bits), before[~rows].view(bits))


ADD_SLOTS = {
    "one_adapter": [2] * 9,
    "consecutive_runs": [0, 0, 0, 2, 2, -1, 4, 4, 4],
    "interleaved": [2, 0, 2, 4, 0, 2, -1, 4, 2],
    "decode_in_slot_order": [0, 2, 3, 4],
    "decode_shuffled": [4, -1, 2, 0, 3],
    "uneven_counts": [3, 0, 3, 2, 3, 0],
}


@pytest.mark.parametrize("token_slots", list(ADD_SLOTS.values()), ids=list(ADD_SLOTS))
@pytest.mark.parametrize("strategy", ["per_adapter", "batched"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_matches_float64(lora_checks, token_slots, strategy, dtype, monkeypatch):
    if strategy == "per_adapter":
        monkeypatch.setattr(reference, "MIN_BATCHED_SLOTS", 10**6)
    else:
        monkeypatch.setattr(reference, "PAD_FACTOR", 10**6)
    case = lora_checks.make_case(
        len(token_slots), RANKS, (16, 8, 24), in_features=32, dtype=dtype, seed=11, token_slots=token_slots
    )
    _check_add(lora_checks, case)


def _layer_layout(case):
    """The layer's reference layout: A slices as views of one [S, slices, R, in] buffer, B as views of B^T."""
    a_all = torch.stack(case.a_slots, dim=1)
    b_views = [b.transpose(1, 2).contiguous().transpose(1, 2) for b in case.b_slots]
    return [a_all[:, s] for s in range(len(case.a_slots))], b_views


@pytest.mark.parametrize(
    "token_slots", [[1, 0, 2], [2, 2, 0, 1, 1, 0], [1] * 5], ids=["decode", "uneven", "one"]
)
@pytest.mark.parametrize("ranks", [(16, 16, 16), (16, 4, 8)], ids=["equal_ranks", "mixed_ranks"])
@pytest.mark.parametrize("strategy", ["per_adapter", "batched"])
def test_fused_add_on_the_layers_reference_layout(lora_checks, token_slots, ranks, strategy, monkeypatch):
    """Stacked A (one shrink for every slice) and B^T buffers; NaN beyond each rank stays unread."""
    if strategy == "per_adapter":
        monkeypatch.setattr(reference, "MIN_BATCHED_SLOTS", 10**6)
    case = lora_checks.make_case(
        len(token_slots), ranks, (16, 8), in_features=32, seed=12, token_slots=token_slots
    )
    a_views, b_views = _layer_layout(case)
    assert reference._stacked(a_views) is not None and reference._stacked(case.a_slots) is None
    assert not b_views[0].is_contiguous()
    case.a_slots = a_views
    _check_add(lora_checks, case, b_views)


class _OpCount(TorchDispatchMode):
    ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def test_batched_decode_launches_the_same_ops_for_any_number_of_adapters(lora_checks):
    counts = []
    for num_slots in (4, 12):
        case = lora_checks.make_case(
            num_slots, (8,) * num_slots, (16, 8, 8), in_features=32, seed=num_slots,
            token_slots=list(range(num_slots))[::-1],
        )  # fmt: skip
        out = torch.zeros(num_slots, 32)
        meta = case.meta
        reference.lora_add(case.x, case.a_slots, case.b_slots, meta, out)  # builds the plan once
        with _OpCount() as count:
            reference.lora_add(case.x, case.a_slots, case.b_slots, meta, out)
        counts.append(count.ops)
    # views included: a gather, per slice 2 bmm and their views, a cat, a scatter
    assert counts[0] == counts[1] <= 3 + 7 * 3


def test_the_plan_is_built_once_per_meta_and_forgotten_by_copy(lora_checks):
    case = lora_checks.make_case(5, RANKS, (8,), in_features=16, token_slots=[0, 2, 2, 3, 4])
    meta = case.meta
    assert reference._plan(meta) is reference._plan(meta)
    first = reference._plan(meta)
    meta.copy_(LoraBatchMeta.build(torch.tensor([4, 4, 3, 2, 0], dtype=torch.int32), case.slot_ranks))
    assert reference._plan(meta) is not first
    assert [g.slot for g in reference._plan(meta).groups] == [0, 2, 3, 4]
    _check_add(lora_checks, case)


@pytest.mark.parametrize("token_slots", [[0] * 4, [2, 1, 0, 1]], ids=["one_adapter", "decode"])
def test_cached_views_see_weights_written_later_and_checks_still_run(lora_checks, token_slots):
    case = lora_checks.make_case(4, (8, 8, 8), (16, 8), in_features=32, seed=14, token_slots=token_slots)
    case.a_slots, b_views = _layer_layout(case)
    meta = case.meta
    first = reference.lora_add(case.x, case.a_slots, b_views, meta, torch.zeros(4, 24))
    for a in case.a_slots:
        a.mul_(2)  # a slot rewritten in place (an adapter loaded into it) while the plan is cached
    second = reference.lora_add(case.x, case.a_slots, b_views, meta, torch.zeros(4, 24))
    torch.testing.assert_close(second, 2 * first)
    with pytest.raises(ValueError, match="columns"):
        reference.lora_add(case.x, case.a_slots, b_views, meta, torch.zeros(4, 25))
    with pytest.raises(ValueError, match="A slice"):
        reference.lora_add(case.x[:, :16], case.a_slots, b_views, meta, torch.zeros(4, 24))
