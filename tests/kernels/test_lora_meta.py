"""LoraBatchMeta: token grouping and the fixed-size tile table the kernels launch over."""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.meta import TOKEN_BLOCK, LoraBatchMeta, max_tiles


def _i32(values):
    return torch.tensor(values, dtype=torch.int32)


def test_groups_tokens_by_slot_with_no_adapter_tokens_last():
    meta = LoraBatchMeta.build(_i32([2, -1, 0, 2, 1, 2, 0]), _i32([8, 0, 16, 4]))
    # slot 1 is empty (rank 0): its token counts as having no adapter
    assert meta.sorted_token_ids.tolist() == [2, 6, 0, 3, 5, 1, 4]
    assert meta.slot_counts.tolist() == [2, 0, 3, 0]
    assert meta.slot_starts.tolist() == [0, 2, 2, 5]
    assert meta.active_slots.tolist() == [0, 2, -1, -1]
    assert meta.num_active.tolist() == [2]
    assert meta.tile_slots.tolist() == [0, 2, -1, -1, -1]
    assert all(t.dtype == torch.int32 for t in vars(meta).values())


@pytest.mark.parametrize("seed", range(20))
def test_tile_table_covers_every_adapter_token_once(seed):
    gen = torch.Generator().manual_seed(seed)
    num_tokens = int(torch.randint(1, 200, (1,), generator=gen))
    num_slots = int(torch.randint(1, 40, (1,), generator=gen))
    ranks = torch.randint(0, 3, (num_slots,), generator=gen).to(torch.int32) * 8
    # skewed compositions: many tokens on few slots as well as one token per slot
    hot = torch.randint(0, num_slots, (3,), generator=gen)
    slots = torch.where(
        torch.rand(num_tokens, generator=gen) < 0.5,
        hot[torch.randint(0, 3, (num_tokens,), generator=gen)],
        torch.randint(-1, num_slots, (num_tokens,), generator=gen),
    ).to(torch.int32)
    meta = LoraBatchMeta.build(slots, ranks)
    assert meta.tile_slots.shape == (max_tiles(num_tokens, num_slots),)
    covered: list[int] = []
    for slot, start, end in zip(meta.tile_slots, meta.tile_starts, meta.tile_ends, strict=True):
        if slot < 0:
            continue
        rows = meta.sorted_token_ids[start : min(start + TOKEN_BLOCK, end)].tolist()
        assert rows and all(int(slots[t]) == int(slot) for t in rows)
        covered += rows
    wanted = [t for t in range(num_tokens) if slots[t] >= 0 and ranks[slots[t]] > 0]
    assert sorted(covered) == wanted


def test_rejects_slot_ids_out_of_range():
    with pytest.raises(ValueError, match="token_slots"):
        LoraBatchMeta.build(_i32([0, 3]), _i32([8, 8, 8]))
    with pytest.raises(ValueError, match="token_slots"):
        LoraBatchMeta.build(_i32([-2]), _i32([8]))
    with pytest.raises(ValueError, match="at least one slot"):
        LoraBatchMeta.build(_i32([-1]), _i32([]))


def test_copy_fills_static_buffers_of_the_same_batch_size():
    static = LoraBatchMeta.build(_i32([-1, -1, -1]), _i32([8, 8]))
    fresh = LoraBatchMeta.build(_i32([1, 0, 1]), _i32([8, 16]))
    buffers = [t.data_ptr() for t in vars(static).values()]
    static.copy_(fresh)
    assert [t.data_ptr() for t in vars(static).values()] == buffers
    for name, value in vars(fresh).items():
        assert torch.equal(getattr(static, name), value), name


def test_empty_batch_has_no_tiles():
    meta = LoraBatchMeta.build(torch.zeros(0, dtype=torch.int64), _i32([8]))
    assert meta.num_tokens == 0 and meta.tile_slots.numel() == 0


def test_unvalidated_build_matches_the_validated_one():
    slots, ranks = _i32([3, -1, 0, 3, 3]), _i32([16, 0, 0, 8])
    checked, unchecked = LoraBatchMeta.build(slots, ranks), LoraBatchMeta.build(slots, ranks, validate=False)
    for name, value in vars(checked).items():
        assert torch.equal(getattr(unchecked, name), value), name


def test_host_slot_ids_are_validated_without_reading_the_device():
    # slot_ranks on the meta device: any read of a device value (a sync on a GPU) would raise
    ranks = _i32([8, 16]).to("meta")
    meta = LoraBatchMeta.build(_i32([0, -1, 1, 1]), ranks)
    assert meta.tile_slots.device.type == "meta"
    assert meta.tile_slots.shape == (max_tiles(4, 2),)
    with pytest.raises(ValueError, match="token_slots"):
        LoraBatchMeta.build(_i32([0, 2]), ranks)


def test_device_slot_ids_are_validated_only_on_request():
    device_slots, ranks = _i32([0, 1]).to("meta"), _i32([8, 16]).to("meta")
    with pytest.raises(RuntimeError, match="meta"):  # validate=True reads the device
        LoraBatchMeta.build(device_slots, ranks)
    assert LoraBatchMeta.build(device_slots, ranks, validate=False).num_tokens == 2
