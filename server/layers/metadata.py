"""Per-step tensors every layer needs, built once per step and passed down explicitly.

The step's tokens run decodes first, then prefill chunks, so each attention group is one
contiguous range of tokens: the Triton kernels read the block tables directly, the torch path
builds what it needs (padded context slots, masks) lazily, once per step, from the same tensors.
`server/batch_buffers.py` builds these in persistent buffers for the model runner;
`build_forward_metadata` here is the one-off form (tests, benchmarks).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

from loraplex.kernels.meta import TOKEN_BLOCK, LoraBatchMeta, max_tiles
from loraplex.server.forward_batch import ForwardBatch


@dataclass(eq=False)
class AttentionGroup:
    """Sequences whose attention runs as one kernel launch: all decodes, or all prefill chunks.

    Their tokens are `token_start .. token_start + num_tokens` of the step, sequence by sequence.
    A steady decode batch keeps one group for all its steps (`server/batch_buffers.py`): its
    tensors are views of persistent buffers rewritten in place, and `move_on` sets what else
    changes, so a group is valid for the step it was handed out with, until the next one.
    """

    block_tables: torch.Tensor  # int32 [B, width] block of positions i*block_size.. (padding: 0)
    context_lens: torch.Tensor  # int32 [B] cached + new tokens of each sequence
    query_starts: torch.Tensor  # int32 [B + 1] first row of each sequence's queries among the group's tokens
    num_seqs: int
    max_query_len: int
    max_context_len: int
    token_start: int
    num_tokens: int
    host_context_lens: np.ndarray  # the same as numpy (the torch path loops over prefill sequences)
    host_query_starts: np.ndarray
    _lazy: dict = field(default_factory=dict, repr=False, compare=False)

    def move_on(self, max_context_len: int, block_tables: torch.Tensor | None = None) -> None:
        """The next step of a steady decode group: its longest context (and a new block-table
        width); what the torch path built from the last step's values is dropped."""
        self.max_context_len = max_context_len
        if block_tables is not None:
            self.block_tables = block_tables
        if self._lazy:
            self._lazy.clear()

    @property
    def token_slice(self) -> slice:
        return slice(self.token_start, self.token_start + self.num_tokens)

    def context_slots(self, block_size: int) -> torch.Tensor:
        """[B, max_context_len] flat cache slot of every context position (torch path; built once)."""
        slots = self._lazy.get("slots")
        if slots is None:
            width = -(-self.max_context_len // block_size)
            offsets = torch.arange(block_size, device=self.block_tables.device)
            blocks = self.block_tables[:, :width].long()
            slots = (blocks[:, :, None] * block_size + offsets).view(self.num_seqs, -1)[
                :, : self.max_context_len
            ]
            self._lazy["slots"] = slots
        return slots

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """bool [B, 1, 1, max_context_len]: key j is visible to the sequence's one query (built once per window)."""
        key = ("decode_mask", window)
        mask = self._lazy.get(key)
        if mask is None:
            k = torch.arange(self.max_context_len, device=self.context_lens.device)[None, :]
            lens = self.context_lens.long()[:, None]
            mask = k < lens
            if window is not None:
                mask &= k > lens - 1 - window  # transformers: kv_idx > q_idx - sliding_window
            mask = mask[:, None, None, :]
            self._lazy[key] = mask
        return mask


@dataclass(frozen=True)
class ForwardMetadata:
    """Where each of the step's T new tokens goes and what it attends to; the backends to run."""

    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV-cache slot (block * block_size + offset), -1: write nothing
    attention_groups: tuple[AttentionGroup, ...]  # decodes first
    logits_indices: (
        torch.Tensor
    )  # [num chunks] index into the T tokens of each chunk's last token, batch order
    lora: LoraBatchMeta | None  # None when no token of this step uses an adapter
    block_size: int
    attention_backend: str = "torch"  # triton | torch, chosen once by the model runner
    lora_backend: str = "reference"  # triton | reference (loraplex.kernels.backend)
    padded: bool = False  # idle rows at the end (slot_mapping -1): a graph bucket's padding
    lora_workspace: torch.Tensor | None = None  # flat float32, zeroed by the model each step (see LoraLinear)


def lora_meta_arrays(token_slots: np.ndarray, slot_ranks: np.ndarray) -> dict[str, np.ndarray]:
    """`LoraBatchMeta` fields (all but slot_ranks) computed on the host, as `LoraBatchMeta.build` does on the device."""
    num_slots, num_tokens = slot_ranks.shape[0], token_slots.shape[0]
    clipped = np.clip(token_slots, 0, num_slots - 1)
    has_adapter = (token_slots >= 0) & (slot_ranks[clipped] > 0)
    key = np.where(has_adapter, token_slots, num_slots)
    sorted_ids = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=num_slots + 1)[:num_slots]
    starts = np.cumsum(counts) - counts
    is_active = counts > 0
    active = np.full(num_slots, -1, dtype=np.int64)
    active_ids = np.flatnonzero(is_active)
    active[: active_ids.shape[0]] = active_ids
    tiles_per_slot = (counts + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    tiles_end = np.cumsum(tiles_per_slot)
    tile_ids = np.arange(max_tiles(num_tokens, num_slots))
    owner = np.searchsorted(tiles_end, tile_ids, side="right")
    used = owner < num_slots
    owner = np.minimum(owner, num_slots - 1)
    first_tile = tiles_end[owner] - tiles_per_slot[owner]
    return {
        "token_slots": token_slots,
        "sorted_token_ids": sorted_ids,
        "slot_counts": counts,
        "slot_starts": starts,
        "active_slots": active,
        "num_active": np.array([active_ids.shape[0]]),
        "tile_slots": np.where(used, owner, -1),
        "tile_starts": np.where(used, starts[owner] + (tile_ids - first_tile) * TOKEN_BLOCK, 0),
        "tile_ends": np.where(used, starts[owner] + counts[owner], 0),
    }


def build_forward_metadata(
    batch: ForwardBatch,
    block_size: int,
    windows: Iterable[int | None],
    slot_ranks: torch.Tensor,
    device: torch.device,
    attention_backend: str | None = None,
) -> ForwardMetadata:
    """One step's metadata outside a model runner (tests, benchmarks).

    The tokens run in the runner's order: the decode chunks first, then the others, each
    group in batch order (feed q/k/v in that order; `logits_indices` are in batch order).

    `windows` is accepted for the callers of the old form and unused: masks are built by the
    torch attention path itself. The backend defaults to `attention_backend(device)`.
    """
    from loraplex.server.batch_buffers import BatchBuffers
    from loraplex.server.layers.attention import attention_backend as choose

    del windows
    chunks = batch.chunks
    ranks = slot_ranks.to(torch.int32)
    buffers = BatchBuffers(
        max_seqs=max(1, len(chunks)),
        max_tokens=max(1, batch.num_tokens),
        max_blocks_per_seq=max([len(c.block_table) for c in chunks] + [1]),
        block_size=block_size,
        num_kv_blocks=1 + max([max(c.block_table, default=0) for c in chunks] + [0]),
        num_slots=ranks.shape[0],
        device=device,
        attention_backend=attention_backend or choose(device),
        lora_backend="reference",
    )
    inputs = buffers.build(chunks, ranks.to(device), ranks.cpu().numpy())
    return inputs.meta
