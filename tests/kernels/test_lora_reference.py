"""The torch reference ops against the float64 oracle (the CPU path of the engine)."""

from __future__ import annotations

import pytest
import torch

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


def test_long_batches_are_chunked_without_changing_results(lora_checks, monkeypatch):
    case = lora_checks.make_case(17, RANKS, (16, 8), in_features=32, seed=3)
    whole = reference.lora_shrink(case.x, case.a_slots, case.meta)
    monkeypatch.setattr(reference, "GATHER_BYTES", 1)  # one token per chunk
    torch.testing.assert_close(reference.lora_shrink(case.x, case.a_slots, case.meta), whole)
    lora_checks.check_expand(reference.lora_expand, case, add=True)


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
