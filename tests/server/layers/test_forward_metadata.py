"""build_forward_metadata: cache slots, attention groups, masks and the LoRA token map."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.layers.metadata import build_forward_metadata

CPU = torch.device("cpu")
RANKS = torch.tensor([4, 8], dtype=torch.int32)


def _build(*chunks: SequenceChunk, windows=(None,), block_size: int = 4):
    return build_forward_metadata(ForwardBatch(chunks), block_size, windows, RANKS, CPU)


def test_slots_positions_and_groups() -> None:
    prefill = SequenceChunk(0, (1, 2, 3), 5, (7, 2), None)  # positions 5, 6, 7 in block 2
    decode = SequenceChunk(1, (9,), 2, (4,), 1)
    fresh = SequenceChunk(2, (4, 4), 0, (1,), None)
    meta = _build(prefill, decode, fresh)
    assert meta.positions.tolist() == [5, 6, 7, 2, 0, 1]
    assert meta.slot_mapping.tolist() == [9, 10, 11, 18, 4, 5]
    assert meta.logits_indices.tolist() == [2, 3, 5]
    decodes, prefills = meta.attention_groups  # decodes apart, so prefills don't pad them
    assert (decodes.num_seqs, decodes.max_query_len) == (1, 1)
    assert decodes.token_indices.tolist() == [3]
    assert decodes.context_slots.tolist() == [[16, 17, 18]]
    assert (prefills.num_seqs, prefills.max_query_len) == (2, 3)
    assert prefills.token_indices.tolist() == [0, 1, 2, 4, 5]
    assert prefills.query_rows.tolist() == [0, 1, 2, 3, 4]  # sequence 2 starts at row 3
    assert prefills.context_slots[0].tolist() == [28, 29, 30, 31, 8, 9, 10, 11]
    assert prefills.context_slots[1, :2].tolist() == [4, 5]


def test_one_group_when_all_chunks_are_alike() -> None:
    meta = _build(SequenceChunk(0, (1,), 3, (0,), None), SequenceChunk(1, (2,), 0, (1,), None))
    assert len(meta.attention_groups) == 1
    assert meta.attention_groups[0].token_indices.tolist() == [0, 1]


def test_masks_are_causal_with_sliding_window_and_padding() -> None:
    meta = _build(
        SequenceChunk(0, (1, 2, 3), 3, (0, 1), None),
        SequenceChunk(1, (5, 6), 0, (2,), None),
        windows=(None, 3),
    )
    (group,) = meta.attention_groups
    full, window = group.masks[None][:, 0], group.masks[3][:, 0]
    assert full.shape == (2, 3, 6)
    assert full[0].int().tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert window[0].int().tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    # sequence 1: two real queries, then a padding row that only sees key 0 (keeps softmax finite)
    assert full[1].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


def test_lora_meta_only_when_an_adapter_is_used() -> None:
    assert _build(SequenceChunk(0, (1, 2), 0, (0,), None)).lora is None
    meta = _build(SequenceChunk(0, (1, 2), 0, (0,), None), SequenceChunk(1, (3,), 0, (1,), 1))
    assert meta.lora is not None
    assert meta.lora.token_slots.tolist() == [-1, -1, 1]
    assert meta.lora.slot_ranks.tolist() == [4, 8]


def test_rejects_short_block_tables_and_empty_chunks() -> None:
    with pytest.raises(ValueError, match="block table covers 4 positions, needs 5"):
        _build(SequenceChunk(3, (1, 2), 3, (0,), None))
    with pytest.raises(ValueError, match="at least one token"):
        _build(SequenceChunk(3, (), 0, (0,), None))
