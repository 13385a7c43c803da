"""One persistent block-table row per running sequence, mirrored on the device (see `BatchBuffers`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.server.forward_batch import SequenceChunk


@dataclass
class TableRow:
    index: int
    num_blocks: int  # entries of the sequence's block table mirrored so far
    context_len: int  # positions with K/V after the sequence's last step
    last_step: int


class BlockTableRows:
    """One persistent block-table row per running sequence, on the host and on the device.

    A chunk whose `continues` is set and that resumes where its row left off only appends
    the entries it gained; anything else (a new sequence, a preempted one back with a new
    table, a row evicted for lack of room) rewrites the row. Rows of sequences that stop
    showing up are reused, least recently used first, when rows run out.
    """

    def __init__(self, num_rows: int, width: int, device: torch.device, pin: bool) -> None:
        self.width = width
        self.host_tensor = torch.zeros(num_rows, width, dtype=torch.int32, pin_memory=pin)
        self.host = self.host_tensor.numpy()
        self.host_view = memoryview(self.host)  # `host` entry by entry, without a numpy call
        self.device = self.host_tensor if device.type == "cpu" else self.host_tensor.to(device)
        self._rows: dict[int, TableRow] = {}
        self._free = list(range(num_rows - 1, -1, -1))
        self._dirty_lo, self._dirty_hi = num_rows, 0
        self._step = 0

    def begin_step(self) -> None:
        self._step += 1

    @property
    def step(self) -> int:
        return self._step

    def row_for(self, chunk: SequenceChunk, block_size: int, num_kv_blocks: int) -> int:
        """The sequence's row, updated to cover its table; ValueError when the table is wrong."""
        cached = chunk.num_cached_tokens
        context_len = cached + len(chunk.token_ids)
        row = self._rows.get(chunk.seq_id)
        if row is None or not chunk.continues or row.context_len != cached:
            row = self._claim(chunk.seq_id)
        needed = -(-context_len // block_size)
        if row.num_blocks < needed:
            self.write(row, chunk, needed, block_size, num_kv_blocks)
        row.context_len, row.last_step = context_len, self._step
        return row.index

    def row_of(self, seq_id: int) -> TableRow:
        return self._rows[seq_id]

    def write(
        self, row: TableRow, chunk: SequenceChunk, needed: int, block_size: int, num_kv_blocks: int
    ) -> None:
        """Mirror the chunk's block table into the row up to `needed` entries; ValueError when it is wrong."""
        table = chunk.block_table
        if len(table) < needed:
            raise ValueError(
                f"sequence {chunk.seq_id}: block table covers {len(table) * block_size} positions, "
                f"needs {chunk.context_len}"
            )
        if needed > self.width:
            raise ValueError(
                f"sequence {chunk.seq_id}: {needed} blocks, more than the {self.width} a row holds"
            )
        new = table[row.num_blocks : needed]
        if min(new) < 0 or max(new) >= num_kv_blocks:
            raise ValueError(f"sequence {chunk.seq_id}: block table outside 0..{num_kv_blocks - 1}")
        self.host[row.index, row.num_blocks : needed] = new
        row.num_blocks = needed
        self._dirty_lo, self._dirty_hi = min(self._dirty_lo, row.index), max(self._dirty_hi, row.index + 1)

    def mark_dirty(self, index: int) -> None:
        """Row `index` was written directly (`host`): the next `flush` copies it."""
        self._dirty_lo, self._dirty_hi = min(self._dirty_lo, index), max(self._dirty_hi, index + 1)

    def _claim(self, seq_id: int) -> TableRow:
        old = self._rows.pop(seq_id, None)
        if old is not None:
            self._free.append(old.index)
        if not self._free:
            self._evict()
        row = TableRow(self._free.pop(), 0, 0, self._step)
        self._rows[seq_id] = row
        self.host[row.index] = 0  # no stale entries of an earlier owner past this sequence's blocks
        self._dirty_lo, self._dirty_hi = min(self._dirty_lo, row.index), max(self._dirty_hi, row.index + 1)
        return row

    def _evict(self) -> None:
        """Free the older half of the rows not used in this step."""
        idle = sorted((r.last_step, seq_id) for seq_id, r in self._rows.items() if r.last_step < self._step)
        if not idle:
            raise RuntimeError("more sequences in one step than block-table rows")
        for _, seq_id in idle[: max(1, len(idle) // 2)]:
            self._free.append(self._rows.pop(seq_id).index)

    def flush(self) -> bool:
        """Copy the span of rows written this step to the device (nothing to copy on the CPU); any written?"""
        lo, hi = self._dirty_lo, self._dirty_hi
        if hi > lo and self.device is not self.host_tensor:
            self.device[lo:hi].copy_(self.host_tensor[lo:hi], non_blocking=True)
        self._dirty_lo, self._dirty_hi = self.host.shape[0], 0
        return hi > lo
