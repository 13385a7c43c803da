"""Per-step batch metadata shared by every LoRA layer of one forward pass.

The batch is not sorted by adapter: each token carries a slot id (-1 = base model only).
`LoraBatchMeta.build` groups tokens by slot once per step with device ops only (no host
sync when the slot ids come from the host or are not validated), and cuts
each slot's tokens into tiles of `TOKEN_BLOCK` rows. The kernels launch one program row
per tile of a fixed-size tile table (`max_tiles(T, S)` entries, idle entries hold slot -1),
so the launch grid depends only on the number of tokens and slots, never on which adapters
the batch holds: one CUDA graph per batch size serves every batch composition.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TypeVar

import torch

# Rows of one token tile; the smallest M that `tl.dot` accepts. Decode batches put one or a
# few tokens on each adapter, so a bigger tile would only compute padding.
TOKEN_BLOCK = 16

T = TypeVar("T")


def max_tiles(num_tokens: int, num_slots: int) -> int:
    """Upper bound of the tiles any batch of `num_tokens` over `num_slots` slots needs.

    Slot s needs ceil(c_s / B) <= c_s / B + 1 - 1/B tiles; summed over the at most
    min(S, T) slots that hold tokens this stays below ceil(T / B) + min(S, T).
    """
    return -(-num_tokens // TOKEN_BLOCK) + min(num_slots, num_tokens)


@dataclass(frozen=True)
class LoraBatchMeta:
    """Token grouping for one step. All fields are tensors on the compute device.

    token_slots:      int32 [T]  slot of each token, -1 = no adapter
    slot_ranks:       int32 [S]  rank of the adapter in each slot, 0 = empty slot
    sorted_token_ids: int32 [T]  token indices grouped by slot (stable), tokens without an
                                 adapter (slot -1 or an empty slot) last
    slot_counts:      int32 [S]  tokens on each slot (0 for empty slots)
    slot_starts:      int32 [S]  first position of each slot's tokens in sorted_token_ids
    active_slots:     int32 [S]  slots holding tokens first, in slot order, then -1
    num_active:       int32 [1]  number of slots holding tokens
    tile_slots:       int32 [max_tiles]  slot of each token tile, -1 = idle program
    tile_starts:      int32 [max_tiles]  first position of the tile in sorted_token_ids
    tile_ends:        int32 [max_tiles]  end of the tile's slot run in sorted_token_ids
    """

    token_slots: torch.Tensor
    slot_ranks: torch.Tensor
    sorted_token_ids: torch.Tensor
    slot_counts: torch.Tensor
    slot_starts: torch.Tensor
    active_slots: torch.Tensor
    num_active: torch.Tensor
    tile_slots: torch.Tensor
    tile_starts: torch.Tensor
    tile_ends: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def num_slots(self) -> int:
        return self.slot_ranks.shape[0]

    @property
    def device(self) -> torch.device:
        return self.token_slots.device

    @classmethod
    def build(
        cls, token_slots: torch.Tensor, slot_ranks: torch.Tensor, validate: bool = True
    ) -> LoraBatchMeta:
        """Group tokens by slot with device ops only, on slot_ranks' device.

        token_slots may live on the host (the scheduler's data): `validate` then checks the slot
        ids there, for free, and the ids are copied to the device without the host waiting.
        Token slots already on an accelerator are checked only at the cost of a host sync
        (validate=True); the engine checks slots at its boundary and passes validate=False.
        Without validation, slot ids outside [-1, num_slots) are undefined behaviour.
        """
        if token_slots.dim() != 1 or slot_ranks.dim() != 1:
            raise ValueError("token_slots and slot_ranks must be 1-D")
        if token_slots.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"token_slots must be int32 or int64, got {token_slots.dtype}")
        num_slots = slot_ranks.shape[0]
        if num_slots == 0:
            raise ValueError("slot_ranks must name at least one slot")
        if validate:
            _check_slots(token_slots, num_slots)
        device = slot_ranks.device
        slots = token_slots.to(device=device, dtype=torch.int64, non_blocking=True)
        ranks = slot_ranks.to(torch.int64)
        has_adapter = (slots >= 0) & (ranks[slots.clamp(min=0)] > 0)
        key = torch.where(has_adapter, slots, num_slots)  # no-adapter tokens sort last
        sorted_ids = torch.argsort(key, stable=True)
        counts = torch.zeros(num_slots + 1, dtype=torch.int64, device=device)
        counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_slots]
        starts = torch.cumsum(counts, 0) - counts
        is_active = counts > 0
        order = torch.argsort((~is_active).to(torch.int8), stable=True)
        active = torch.where(is_active[order], order, -1)
        tile_slots, tile_starts, tile_ends = _tile_table(counts, starts, slots.shape[0])
        i32 = torch.int32
        return cls(
            token_slots=slots.to(i32),
            slot_ranks=ranks.to(i32),
            sorted_token_ids=sorted_ids.to(i32),
            slot_counts=counts.to(i32),
            slot_starts=starts.to(i32),
            active_slots=active.to(i32),
            num_active=is_active.sum().reshape(1).to(i32),
            tile_slots=tile_slots.to(i32),
            tile_starts=tile_starts.to(i32),
            tile_ends=tile_ends.to(i32),
        )

    def cached(self, key: str, build: Callable[[], T]) -> T:
        """`build()` once per meta (the reference ops' host-side plan, shared by every layer of a step).

        The tensors of a meta are not written after `build`, except by `copy_`, which forgets
        what was cached here.
        """
        cache = self.__dict__.setdefault("_cache", {})  # frozen: the dict itself, not an attribute
        if key not in cache:
            cache[key] = build()
        return cache[key]

    def copy_(self, other: LoraBatchMeta) -> LoraBatchMeta:
        """Copy `other` into these tensors in place (static buffers of a captured CUDA graph)."""
        for f in fields(self):
            getattr(self, f.name).copy_(getattr(other, f.name))
        self.__dict__.pop("_cache", None)
        return self


def _check_slots(token_slots: torch.Tensor, num_slots: int) -> None:
    if not token_slots.numel():
        return
    if token_slots.device.type == "cpu":
        ids = token_slots.numpy()  # host data: checked by the host, no torch op in the step
        in_range = bool(ids.min() >= -1 and ids.max() < num_slots)
    else:
        in_range = bool(((token_slots >= -1) & (token_slots < num_slots)).all())  # waits for the device
    if not in_range:
        raise ValueError(f"token_slots must lie in [-1, {num_slots})")


def _tile_table(
    counts: torch.Tensor, starts: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each slot's run of sorted tokens into TOKEN_BLOCK tiles; pad the table with slot -1."""
    num_slots = counts.shape[0]
    tiles_per_slot = (counts + TOKEN_BLOCK - 1) // TOKEN_BLOCK
    tiles_end = torch.cumsum(tiles_per_slot, 0)
    tile_ids = torch.arange(max_tiles(num_tokens, num_slots), device=counts.device)
    owner = torch.searchsorted(tiles_end, tile_ids, right=True)  # == num_slots past the last tile
    is_used = owner < num_slots
    owner = owner.clamp(max=num_slots - 1)
    first_tile = tiles_end[owner] - tiles_per_slot[owner]
    tile_starts = starts[owner] + (tile_ids - first_tile) * TOKEN_BLOCK
    tile_ends = starts[owner] + counts[owner]
    idle = torch.zeros_like(tile_starts)
    return (
        torch.where(is_used, owner, -1),
        torch.where(is_used, tile_starts, idle),
        torch.where(is_used, tile_ends, idle),
    )
