"""Per-step tensors every layer needs, built once per step and passed down explicitly."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from loraplex.kernels.lora import LoraBatchMeta
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk

# The token->slot map of the LoRA kernels marks base-only tokens with -1 (their convention).
_NO_ADAPTER = -1


@dataclass(frozen=True)
class AttentionGroup:
    """Sequences whose attention runs as one padded batch: queries `[B, max_query_len]` against
    keys gathered from the paged cache into `[B, max_context_len]`. Decodes (one query each) and
    prefills form separate groups so a long prefill chunk does not pad every decode to its length.
    """

    token_indices: torch.Tensor  # [n] which of the step's T tokens belong to this group
    query_rows: torch.Tensor  # [n] their rows in the padded [B * max_query_len] layout
    context_slots: torch.Tensor  # [B, max_context_len] flat cache slot of every context position (padding: 0)
    masks: dict[int | None, torch.Tensor]  # sliding window (None: full) -> [B, 1, max_q, max_ctx] bool
    num_seqs: int
    max_query_len: int
    # What the Triton kernels read instead (loraplex.kernels.paged_attention): the cache directly.
    block_tables: torch.Tensor  # int32 [B, max_blocks] block of positions i*block_size.. (padding: 0)
    context_lens: torch.Tensor  # int32 [B] cached + new tokens of each sequence
    query_starts: torch.Tensor  # int32 [B + 1] first row of each sequence's queries among the group's tokens


@dataclass(frozen=True)
class ForwardMetadata:
    """Where each of the step's T new tokens goes and what it attends to."""

    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot (block * block_size + offset) of each new token
    attention_groups: tuple[AttentionGroup, ...]
    logits_indices: torch.Tensor  # [num chunks] index into the T tokens of each chunk's last token
    lora: LoraBatchMeta | None  # None when no token of this step uses an adapter


def _chunk_slots(chunk: SequenceChunk, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions 0 .. context_len-1 of one sequence."""
    if len(chunk.block_table) * block_size < chunk.context_len:
        raise ValueError(
            f"sequence {chunk.seq_id}: block table covers {len(chunk.block_table) * block_size} "
            f"positions, needs {chunk.context_len}"
        )
    table = torch.tensor(chunk.block_table, dtype=torch.long)
    pos = torch.arange(chunk.context_len)
    return table[pos // block_size] * block_size + pos % block_size


def _attention_masks(
    query_positions: torch.Tensor, max_context_len: int, windows: Iterable[int | None]
) -> dict[int | None, torch.Tensor]:
    """Causal (+ sliding window) masks; padded query rows (position -1) see key 0 so softmax stays finite."""
    q = query_positions[:, None, :, None]  # [B, 1, Q, 1]
    k = torch.arange(max_context_len)[None, None, None, :]  # [1, 1, 1, S]
    padding = q < 0
    masks = {}
    for window in windows:
        allowed = k <= q
        if window is not None:
            allowed &= k > q - window  # transformers: kv_idx > q_idx - sliding_window
        masks[window] = allowed | (padding & (k == 0))
    return masks


def _attention_group(
    chunks: Sequence[SequenceChunk],
    first_tokens: Sequence[int],
    context_slots: Sequence[torch.Tensor],
    windows: Iterable[int | None],
    block_size: int,
    device: torch.device,
) -> AttentionGroup:
    """One padded attention batch over `chunks`; `first_tokens[i]` is chunk i's first index in the step."""
    num_seqs, max_query_len = len(chunks), max(c.num_tokens for c in chunks)
    padded_slots = torch.zeros(num_seqs, max(c.context_len for c in chunks), dtype=torch.long)
    query_positions = torch.full((num_seqs, max_query_len), -1, dtype=torch.long)
    token_indices, query_rows = [], []
    for b, (chunk, first, slots) in enumerate(zip(chunks, first_tokens, context_slots, strict=True)):
        padded_slots[b, : chunk.context_len] = slots
        query_positions[b, : chunk.num_tokens] = torch.arange(chunk.num_cached_tokens, chunk.context_len)
        token_indices.append(torch.arange(first, first + chunk.num_tokens))
        query_rows.append(b * max_query_len + torch.arange(chunk.num_tokens))
    masks = _attention_masks(query_positions, padded_slots.shape[1], windows)
    num_blocks = [-(-c.context_len // block_size) for c in chunks]
    block_tables = torch.zeros(num_seqs, max(num_blocks), dtype=torch.int32)
    for b, (chunk, count) in enumerate(zip(chunks, num_blocks, strict=True)):
        block_tables[b, :count] = torch.tensor(chunk.block_table[:count], dtype=torch.int32)
    query_starts = torch.tensor([0] + [c.num_tokens for c in chunks], dtype=torch.int32).cumsum(0)
    return AttentionGroup(
        token_indices=torch.cat(token_indices).to(device),
        query_rows=torch.cat(query_rows).to(device),
        context_slots=padded_slots.to(device),
        masks={w: m.to(device) for w, m in masks.items()},
        num_seqs=num_seqs,
        max_query_len=max_query_len,
        block_tables=block_tables.to(device),
        context_lens=torch.tensor([c.context_len for c in chunks], dtype=torch.int32).to(device),
        query_starts=query_starts.to(dtype=torch.int32, device=device),
    )


def _lora_meta(
    token_slots: torch.Tensor, slot_ranks: torch.Tensor, device: torch.device
) -> LoraBatchMeta | None:
    """None when no token uses an adapter: the layers then skip LoRA entirely (no kernel launch)."""
    if not bool((token_slots != _NO_ADAPTER).any()):
        return None
    return LoraBatchMeta.build(token_slots.to(device), slot_ranks.to(device))


def build_forward_metadata(
    batch: ForwardBatch,
    block_size: int,
    windows: Iterable[int | None],
    slot_ranks: torch.Tensor,
    device: torch.device,
) -> ForwardMetadata:
    """Turn the scheduler's chunks into the step's index tensors (built on the CPU, then moved)."""
    chunks = batch.chunks
    if not chunks or any(c.num_tokens == 0 for c in chunks):
        raise ValueError("a forward batch needs at least one chunk and every chunk at least one token")
    windows = tuple(windows)
    slots = [_chunk_slots(chunk, block_size) for chunk in chunks]
    counts = torch.tensor([c.num_tokens for c in chunks])
    ends = counts.cumsum(0)
    firsts = (ends - counts).tolist()
    groups = []
    for is_decode in (True, False):
        members = [i for i, c in enumerate(chunks) if (c.num_tokens == 1) == is_decode]
        if members:
            picked = [chunks[i] for i in members], [firsts[i] for i in members], [slots[i] for i in members]
            groups.append(_attention_group(*picked, windows, block_size, device))
    token_slots = [
        torch.full((c.num_tokens,), _NO_ADAPTER if c.lora_slot is None else c.lora_slot, dtype=torch.int32)
        for c in chunks
    ]
    return ForwardMetadata(
        positions=torch.cat([torch.arange(c.num_cached_tokens, c.context_len) for c in chunks]).to(device),
        slot_mapping=torch.cat([s[c.num_cached_tokens :] for c, s in zip(chunks, slots, strict=True)]).to(
            device
        ),
        attention_groups=tuple(groups),
        logits_indices=(ends - 1).to(device),
        lora=_lora_meta(torch.cat(token_slots), slot_ranks, device),
    )
