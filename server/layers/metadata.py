"""Per-step tensors every layer needs, built once per step and passed down explicitly."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from loraplex.kernels.lora import LoraBatchMeta
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk

# The token->slot map of the LoRA kernels marks base-only tokens with -1 (their convention).
_NO_ADAPTER = -1


@dataclass(frozen=True)
class ForwardMetadata:
    """Where each new token goes and what it attends to, in the padded per-sequence layout.

    `T` new tokens from `B` sequences. Attention runs on queries padded to `[B, max_query_len]`
    against keys gathered from the paged cache into `[B, max_context_len]`.
    """

    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot (block * block_size + offset) of each new token
    query_rows: torch.Tensor  # [T] row of each new token in the padded [B * max_query_len] layout
    context_slots: torch.Tensor  # [B, max_context_len] flat slot of every context position (padding: 0)
    masks: dict[int | None, torch.Tensor]  # sliding window (None: full) -> [B, 1, max_q, max_ctx] bool
    logits_indices: torch.Tensor  # [B] index into the T tokens of each sequence's last token
    lora: LoraBatchMeta | None  # None when no token of this step uses an adapter
    num_seqs: int
    max_query_len: int


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
    num_seqs = len(chunks)
    max_query_len = max(c.num_tokens for c in chunks)
    max_context_len = max(c.context_len for c in chunks)
    context_slots = torch.zeros(num_seqs, max_context_len, dtype=torch.long)
    query_positions = torch.full((num_seqs, max_query_len), -1, dtype=torch.long)
    positions, slot_mapping, query_rows, token_slots = [], [], [], []
    for b, chunk in enumerate(chunks):
        slots = _chunk_slots(chunk, block_size)
        context_slots[b, : chunk.context_len] = slots
        new_positions = torch.arange(chunk.num_cached_tokens, chunk.context_len)
        query_positions[b, : chunk.num_tokens] = new_positions
        positions.append(new_positions)
        slot_mapping.append(slots[chunk.num_cached_tokens :])
        query_rows.append(b * max_query_len + torch.arange(chunk.num_tokens))
        lora_slot = _NO_ADAPTER if chunk.lora_slot is None else chunk.lora_slot
        token_slots.append(torch.full((chunk.num_tokens,), lora_slot, dtype=torch.int32))
    ends = torch.tensor([c.num_tokens for c in chunks]).cumsum(0) - 1
    masks = _attention_masks(query_positions, max_context_len, windows)
    return ForwardMetadata(
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slot_mapping).to(device),
        query_rows=torch.cat(query_rows).to(device),
        context_slots=context_slots.to(device),
        masks={w: m.to(device) for w, m in masks.items()},
        logits_indices=ends.to(device),
        lora=_lora_meta(torch.cat(token_slots), slot_ranks, device),
        num_seqs=num_seqs,
        max_query_len=max_query_len,
    )
