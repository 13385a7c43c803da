"""The contract between the scheduler side and the model runner: what to compute this step.

The scheduler decides *which* tokens of *which* sequences run; the model runner turns a
`ForwardBatch` into tensors and logits. Nothing here knows about torch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class SequenceChunk(NamedTuple):
    """New tokens of one sequence to run through the model in this step.

    A named tuple rather than a frozen dataclass: the engine makes one per sequence per step,
    and a frozen dataclass's `__init__` costs about four times as much.

    The sequence already has `num_cached_tokens` tokens whose K/V sit in the paged cache
    (positions `0 .. num_cached_tokens-1`); `token_ids` are the next ones, at positions
    `num_cached_tokens ..`. A prefill chunk has many tokens, a decode chunk one.
    `block_table[i]` is the physical KV block holding positions `i*block_size .. (i+1)*block_size-1`;
    it already covers every position of this chunk.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    num_cached_tokens: int
    block_table: tuple[int, ...]
    lora_slot: int | None  # GPU slot of the request's adapter, None = base model only
    needs_logits: bool = True  # False for a prefill chunk that does not reach the prompt's end
    # True when the sequence ran in an earlier step and its block table only grew since (no
    # preemption in between): the runner then copies only the new entries. False: all of them.
    continues: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        return self.num_cached_tokens + len(self.token_ids)


@dataclass(frozen=True)
class ForwardBatch:
    """One model step. Chunks may mix prefill and decode, adapters and base-only."""

    chunks: tuple[SequenceChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def lora_slots(self) -> frozenset[int]:
        return frozenset(c.lora_slot for c in self.chunks if c.lora_slot is not None)


class DecodeStep(NamedTuple):
    """The next decode step of a steady batch: the same sequences, in the same order, one token each.

    `index` counts the steps of this batch (`layout` identifies it): a runner whose last step was
    `index - 1` of the same layout only writes the new token ids (`token_ids[i]` for row `i`) and the
    block-table entries in `grown` (row, new block id), and moves every other value on by one
    position. Any other runner state rebuilds the step from `chunks()`, the same step as a
    `ForwardBatch`. A tuple: one per step, cheap to make.
    """

    layout: object
    index: int
    token_ids: list[int]  # row i's input token
    grown: tuple[tuple[int, int], ...]
    chunks: Callable[[], ForwardBatch]

    @property
    def num_seqs(self) -> int:
        return len(self.token_ids)
