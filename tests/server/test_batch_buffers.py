"""BatchBuffers: incremental step inputs equal inputs built from scratch, whatever the history."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from loraplex.server.batch_buffers import BatchBuffers
from loraplex.server.forward_batch import SequenceChunk

BS = 4
CPU = torch.device("cpu")
RANKS = torch.tensor([8, 0, 16], dtype=torch.int32)


def _buffers(max_seqs: int = 8, max_tokens: int = 64) -> BatchBuffers:
    return BatchBuffers(
        max_seqs=max_seqs, max_tokens=max_tokens, max_blocks_per_seq=16, block_size=BS, num_kv_blocks=200,
        num_slots=3, device=CPU, attention_backend="torch", lora_backend="reference",
    )  # fmt: skip


def _snapshot(inputs) -> dict:
    meta = inputs.meta
    out = {
        "ids": inputs.input_ids.tolist(),
        "positions": meta.positions.tolist(),
        "slots": meta.slot_mapping.tolist(),
        "logits": meta.logits_indices.tolist(),
        "order": inputs.order,
    }
    for i, g in enumerate(meta.attention_groups):
        out[f"g{i}"] = (
            g.block_tables.tolist(), g.context_lens.tolist(), g.query_starts.tolist(), g.token_slice,
            g.max_query_len, g.max_context_len, g.context_slots(BS).tolist(),
        )  # fmt: skip
    if meta.lora is not None:
        out["lora"] = {k: v.tolist() for k, v in vars(meta.lora).items()}
    return out


class _Seq:
    def __init__(self, seq_id: int, prompt: int, slot: int | None, blocks: list[int]) -> None:
        self.seq_id, self.slot, self.blocks = seq_id, slot, blocks
        self.cached, self.total, self.ran = 0, prompt, False

    def chunk(self, budget: int) -> SequenceChunk:
        n = min(self.total - self.cached, budget)
        return SequenceChunk(
            self.seq_id, tuple(range(self.cached, self.cached + n)), self.cached,
            tuple(self.blocks), self.slot, continues=self.ran,
        )  # fmt: skip


def test_incremental_inputs_equal_fresh_ones_over_a_random_history() -> None:
    rng = random.Random(0)
    free = list(range(200))
    rng.shuffle(free)
    live: list[_Seq] = []
    incremental, next_id = _buffers(), 0
    for _ in range(120):
        if len(live) < 6 and rng.random() < 0.3:
            live.append(_Seq(next_id, rng.randint(1, 9), rng.choice([None, 0, 1, 2]), []))
            next_id += 1
        done = [i for i, seq in enumerate(live) if seq.total > 40]
        if live and (done or rng.random() < 0.1):  # finished, or preempted: back with a fresh table
            seq = live.pop(done[0] if done else rng.randrange(len(live)))
            free.extend(seq.blocks)
            if not done and rng.random() < 0.5:
                seq.blocks, seq.cached, seq.ran = [], 0, False
                live.append(seq)
        if not live:
            continue
        chunks = []
        for seq in live:
            chunk = seq.chunk(budget=rng.randint(1, 6))
            while len(seq.blocks) * BS < chunk.context_len:
                seq.blocks.append(free.pop())
            chunks.append(seq.chunk(budget=chunk.num_tokens))
        got = _snapshot(incremental.build(chunks, RANKS, RANKS.numpy().astype(np.int64)))
        want = _snapshot(_buffers().build(chunks, RANKS, RANKS.numpy().astype(np.int64)))
        assert got == want
        for seq, chunk in zip(live, chunks, strict=True):
            seq.cached, seq.ran = chunk.context_len, True
            if seq.cached == seq.total:
                seq.total += 1  # decode one more next step


def test_steady_decoding_writes_only_the_new_block_entries() -> None:
    buffers = _buffers()
    ranks = RANKS.numpy().astype(np.int64)
    first = buffers.build([SequenceChunk(0, (1, 2, 3), 0, (5,), 0)], RANKS, ranks)
    assert buffers.tables.host[0, :2].tolist() == [5, 0]
    buffers.tables.host[0, 0] = 99  # the row is not rewritten while the sequence continues
    step = buffers.build([SequenceChunk(0, (4,), 3, (5,), 0, continues=True)], RANKS, ranks)
    assert step.meta.slot_mapping.tolist() == [99 * BS + 3]
    step = buffers.build([SequenceChunk(0, (5,), 4, (5, 7), 0, continues=True)], RANKS, ranks)
    assert buffers.tables.host[0, :2].tolist() == [99, 7] and step.meta.slot_mapping.tolist() == [28]
    # not continuing (preempted and back): the whole row is written again
    step = buffers.build([SequenceChunk(0, (5,), 4, (6, 8), 0)], RANKS, ranks)
    assert step.meta.slot_mapping.tolist() == [32] and step.meta.attention_groups[
        0
    ].block_tables.tolist() == [[6, 8]]
    assert first.meta.lora is not None


def test_padding_to_a_bucket_adds_idle_rows() -> None:
    buffers = _buffers()
    chunks = [SequenceChunk(0, (7,), 2, (3,), 2), SequenceChunk(1, (8,), 5, (1, 4), None)]
    inputs = buffers.build(chunks, RANKS, RANKS.numpy().astype(np.int64), pad_to=4)
    meta = inputs.meta
    assert inputs.num_tokens == 4 and inputs.input_ids.tolist() == [7, 8, 0, 0]
    assert meta.slot_mapping.tolist() == [14, 17, -1, -1]  # idle rows write nothing
    assert meta.logits_indices.tolist() == [0, 1]
    (group,) = meta.attention_groups
    assert group.context_lens.tolist() == [3, 6, 1, 1]
    assert group.block_tables.shape == (4, 16)  # fixed width: graph replays read the same shape
    assert meta.lora is not None and meta.lora.token_slots.tolist() == [2, -1, -1, -1]


def test_rows_are_reused_when_sequences_stop_showing_up() -> None:
    buffers = _buffers(max_seqs=2)  # 5 rows
    ranks = RANKS.numpy().astype(np.int64)
    for seq_id in range(12):
        inputs = buffers.build([SequenceChunk(seq_id, (1,), 0, (seq_id,), None)], RANKS, ranks)
        assert inputs.meta.slot_mapping.tolist() == [seq_id * BS]


def test_rejects_what_does_not_fit() -> None:
    buffers = _buffers(max_tokens=4)
    ranks = RANKS.numpy().astype(np.int64)
    with pytest.raises(ValueError, match="exceed the buffers"):
        buffers.build([SequenceChunk(0, (1,) * 5, 0, (0, 1), None)], RANKS, ranks)
    with pytest.raises(ValueError, match=r"outside 0\.\.199"):
        buffers.build([SequenceChunk(0, (1,), 0, (200,), None)], RANKS, ranks)


@pytest.mark.parametrize("pad_to", [0, 8], ids=["eager", "bucket"])
def test_steady_decode_steps_equal_fresh_ones_and_skip_the_per_step_arrays(pad_to: int) -> None:
    """Decode steps of the same sequences take the steady path (no per-step arrays built), across
    block boundaries; a changed adapter rank or a sequence leaving falls back to the full build."""
    ranks = RANKS.numpy().astype(np.int64).copy()
    buffers = _buffers()
    full_builds = []
    host_arrays = buffers._host_arrays
    buffers._host_arrays = lambda *a: full_builds.append(1) or host_arrays(*a)  # type: ignore[method-assign]
    free = list(range(199, -1, -1))
    live = [_Seq(i, 3 + i, [None, 0, 1, 2][i % 4], []) for i in range(5)]
    for step in range(24):
        if step == 12:
            ranks[1] = 4  # slot 1 gets an adapter: the LoRA grouping changes
        if step == 18:
            live.pop(2)
        chunks = []
        for seq in live:
            chunk = seq.chunk(budget=16)
            while len(seq.blocks) * BS < chunk.context_len:
                seq.blocks.append(free.pop())
            chunks.append(seq.chunk(budget=16))
        slot_ranks = torch.from_numpy(ranks.astype(np.int32))
        inputs = buffers.build(chunks, slot_ranks, ranks, pad_to=pad_to if step else 0)
        fresh = _buffers().build(chunks, slot_ranks, ranks, pad_to=pad_to if step else 0)
        assert _snapshot(inputs) == _snapshot(fresh)
        got, want = inputs.meta.attention_groups[0], fresh.meta.attention_groups[0]
        assert got.host_context_lens.tolist() == want.host_context_lens.tolist()
        assert inputs.logits_in_order == (step > 0 and not pad_to)
        for seq, chunk in zip(live, chunks, strict=True):
            seq.cached, seq.ran, seq.total = chunk.context_len, True, chunk.context_len + 1
    # the prefill, the first decode step, the rank change, the departure
    assert len(full_builds) == 4
