"""build_forward_metadata: cache slots, padded layout, masks and the LoRA token map."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.layers.metadata import build_forward_metadata

CPU = torch.device("cpu")
RANKS = torch.tensor([4, 8], dtype=torch.int32)


def _build(*chunks: SequenceChunk, windows=(None,), block_size: int = 4):
    return build_forward_metadata(ForwardBatch(chunks), block_size, windows, RANKS, CPU)


def test_slots_positions_and_padded_rows() -> None:
    prefill = SequenceChunk(0, (1, 2, 3), 5, (7, 2), None)  # positions 5, 6, 7 in block 2
    decode = SequenceChunk(1, (9,), 2, (4,), 1)
    meta = _build(prefill, decode)
    assert meta.positions.tolist() == [5, 6, 7, 2]
    assert meta.slot_mapping.tolist() == [2 * 4 + 1, 2 * 4 + 2, 2 * 4 + 3, 4 * 4 + 2]
    assert meta.query_rows.tolist() == [0, 1, 2, 3]  # max_query_len 3: sequence 1 starts at row 3
    assert meta.context_slots[0].tolist() == [28, 29, 30, 31, 8, 9, 10, 11]
    assert meta.context_slots[1, :3].tolist() == [16, 17, 18]
    assert meta.logits_indices.tolist() == [2, 3]
    assert (meta.num_seqs, meta.max_query_len) == (2, 3)


def test_masks_are_causal_with_sliding_window_and_padding() -> None:
    meta = _build(
        SequenceChunk(0, (1, 2), 4, (0, 1), None), SequenceChunk(1, (5,), 0, (2,), None), windows=(None, 3)
    )
    full, window = meta.masks[None][:, 0], meta.masks[3][:, 0]
    assert full.shape == (2, 2, 6)
    assert full[0].int().tolist() == [[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    assert window[0].int().tolist() == [[0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1]]
    # sequence 1: one real query, then a padding row that only sees key 0 (keeps softmax finite)
    assert full[1].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]


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
