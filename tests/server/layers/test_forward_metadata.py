"""Step metadata: cache slots, run order (decodes first), attention groups, masks, the LoRA grouping."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from loraplex.kernels.meta import LoraBatchMeta
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.layers.metadata import build_forward_metadata, lora_meta_arrays

CPU = torch.device("cpu")
RANKS = torch.tensor([4, 8], dtype=torch.int32)


def _build(*chunks: SequenceChunk, block_size: int = 4, ranks: torch.Tensor = RANKS):
    return build_forward_metadata(ForwardBatch(chunks), block_size, (None,), ranks, CPU)


def test_slots_positions_and_groups() -> None:
    prefill = SequenceChunk(0, (1, 2, 3), 5, (7, 2), None)  # positions 5, 6, 7 in block 2
    decode = SequenceChunk(1, (9,), 2, (4,), 1)
    fresh = SequenceChunk(2, (4, 4), 0, (1,), None)
    meta = _build(prefill, decode, fresh)
    # run order: the decode, then the prefill chunks in batch order
    assert meta.positions.tolist() == [2, 5, 6, 7, 0, 1]
    assert meta.slot_mapping.tolist() == [18, 9, 10, 11, 4, 5]
    assert meta.logits_indices.tolist() == [3, 0, 5]  # batch order
    decodes, prefills = meta.attention_groups
    assert (decodes.num_seqs, decodes.max_query_len, decodes.token_slice) == (1, 1, slice(0, 1))
    assert decodes.context_slots(4).tolist() == [[16, 17, 18]]
    assert (prefills.num_seqs, prefills.max_query_len, prefills.token_slice) == (2, 3, slice(1, 6))
    assert prefills.query_starts.tolist() == [0, 3, 5] and prefills.context_lens.tolist() == [8, 2]
    assert prefills.context_slots(4)[0].tolist() == [28, 29, 30, 31, 8, 9, 10, 11]
    assert prefills.context_slots(4)[1, :2].tolist() == [4, 5]
    assert prefills.block_tables.tolist() == [[7, 2], [1, 0]]  # cut to the group's widest context


def test_one_group_when_all_chunks_are_alike() -> None:
    meta = _build(SequenceChunk(0, (1,), 3, (0,), None), SequenceChunk(1, (2,), 0, (1,), None))
    (group,) = meta.attention_groups
    assert group.token_slice == slice(0, 2) and meta.logits_indices.tolist() == [0, 1]


def test_decode_mask_covers_the_context_and_the_window() -> None:
    meta = _build(SequenceChunk(0, (1,), 5, (0, 1), None), SequenceChunk(1, (5,), 1, (2,), None))
    (group,) = meta.attention_groups
    assert group.decode_mask(None)[:, 0, 0].int().tolist() == [[1] * 6, [1, 1, 0, 0, 0, 0]]
    assert group.decode_mask(3)[:, 0, 0].int().tolist() == [[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    assert group.decode_mask(3) is group.decode_mask(3)  # built once per step


def test_lora_meta_only_when_an_adapter_is_used() -> None:
    assert _build(SequenceChunk(0, (1, 2), 0, (0,), None)).lora is None
    empty_slot = torch.tensor([4, 0], dtype=torch.int32)
    assert _build(SequenceChunk(0, (1,), 0, (0,), 1), ranks=empty_slot).lora is None
    meta = _build(SequenceChunk(0, (1, 2), 0, (0,), None), SequenceChunk(1, (3,), 0, (1,), 1))
    assert meta.lora is not None
    assert meta.lora.token_slots.tolist() == [1, -1, -1]  # the decode runs first
    assert meta.lora.slot_ranks.tolist() == [4, 8]


@pytest.mark.parametrize("seed", range(6))
def test_host_lora_grouping_equals_the_device_build(seed: int) -> None:
    gen = np.random.default_rng(seed)
    num_slots, num_tokens = int(gen.integers(1, 9)), int(gen.integers(1, 70))
    ranks = gen.integers(0, 3, num_slots) * 8
    slots = gen.integers(-1, num_slots, num_tokens)
    host = lora_meta_arrays(slots, ranks)
    device = LoraBatchMeta.build(torch.from_numpy(slots), torch.from_numpy(ranks))
    for f in dataclasses.fields(LoraBatchMeta):
        if f.name != "slot_ranks":
            assert host[f.name].tolist() == getattr(device, f.name).tolist(), f.name


def test_rejects_short_block_tables_and_empty_chunks() -> None:
    with pytest.raises(ValueError, match="block table covers 4 positions, needs 5"):
        _build(SequenceChunk(3, (1, 2), 3, (0,), None))
    with pytest.raises(ValueError, match="at least one token"):
        _build(SequenceChunk(3, (), 0, (0,), None))
