"""A step's per-sequence and per-token values as numpy arrays, in run order (see `BatchBuffers`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_ADAPTER = -1


@dataclass(frozen=True)
class HostStep:
    """The step's per-sequence and per-token values as numpy arrays, in run order."""

    block_size: int
    rows: np.ndarray
    num_cached: np.ndarray
    num_new: np.ndarray
    seq_slots: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    slot_mapping: np.ndarray
    token_slots: np.ndarray
    context_lens: np.ndarray
    query_starts: np.ndarray
    num_decodes: int
    num_real: int  # sequences before padding
    narrow: bool  # block tables cut to the step's widest context (False: fixed width, for graphs)

    @property
    def num_seqs(self) -> int:
        return self.rows.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def make(cls, table: np.ndarray, bs: int, rows, cached, new, slots, ids, pad_to: int) -> HostStep:
        rows_a, cached_a, new_a = np.asarray(rows), np.asarray(cached), np.asarray(new)
        slots_a, ids_a = np.asarray(slots, dtype=np.int64), np.asarray(ids, dtype=np.int64)
        n = rows_a.shape[0]
        num_decodes = int(np.count_nonzero(new_a == 1))
        starts = np.zeros(n + 1, dtype=np.int64)
        np.cumsum(new_a, out=starts[1:])
        if num_decodes == n:
            positions, token_seq = cached_a, None
        else:
            token_seq = np.repeat(np.arange(n), new_a)
            positions = np.arange(starts[-1]) - starts[token_seq] + cached_a[token_seq]
        token_rows = rows_a if token_seq is None else rows_a[token_seq]
        slot_mapping = table[token_rows, positions // bs].astype(np.int64) * bs + positions % bs
        token_slots = slots_a if token_seq is None else slots_a[token_seq]
        step = cls(bs, rows_a, cached_a, new_a, slots_a, ids_a, positions, slot_mapping, token_slots,
                   cached_a + new_a, starts, num_decodes, n, pad_to == 0)  # fmt: skip
        return step.padded(pad_to) if pad_to > n else step

    def padded(self, size: int) -> HostStep:
        """A decode-only step grown to `size` idle rows: token 0, no cache write, one context slot, no adapter."""
        if self.num_decodes != self.num_seqs:
            raise ValueError("only decode-only steps are padded")
        extra = size - self.num_seqs

        def grow(a: np.ndarray, fill: int) -> np.ndarray:
            return np.concatenate([a, np.full(extra, fill, dtype=a.dtype)])

        return HostStep(
            self.block_size, grow(self.rows, 0), grow(self.num_cached, 0), grow(self.num_new, 1),
            grow(self.seq_slots, NO_ADAPTER), grow(self.ids, 0), grow(self.positions, 0),
            grow(self.slot_mapping, -1), grow(self.token_slots, NO_ADAPTER), grow(self.context_lens, 1),
            np.arange(size + 1), size, self.num_real, False,
        )  # fmt: skip

    def logits_indices(self, order: tuple[int, ...]) -> np.ndarray:
        """Row of each chunk's last token, in batch order (padding rows get none)."""
        last = self.query_starts[1 : self.num_real + 1] - 1
        out = np.empty_like(last)
        out[np.asarray(order)] = last
        return out

    def uses_lora(self, host_ranks: np.ndarray) -> bool:
        used = self.seq_slots[self.seq_slots >= 0]
        return bool(used.size) and bool((host_ranks[used] > 0).any())
