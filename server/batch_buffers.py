"""Persistent step inputs: the batch state lives in buffers sized once, updated by what changed.

Per step the host fills two staging arrays (int64: token ids, positions, cache slots, logits
rows; int32: context lengths, query starts, the token -> LoRA slot map and its grouping, the
rows of the block table) with numpy, and each goes to the device in one copy. Block tables
stay on the device between steps, one row per running sequence: a step writes only the
entries a sequence gained since its last step (one copy of the span of changed rows), and the
step's table is one `index_select` of its rows. No torch op runs per sequence.

On CUDA the staging arrays are pinned and the copies are asynchronous; they are rewritten only
in the next step, after the sampled-token copy of this one has synchronised the stream. On the
CPU the "device" buffers are the staging arrays themselves (no copy at all).

Every device view a step hands out starts at the same address for the same (tokens, sequences)
shape, which is what CUDA graph replay needs (`server/cuda_graphs.py` pads decode batches to
bucket sizes and replays graphs captured over these views).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from loraplex.kernels.meta import LoraBatchMeta, max_tiles
from loraplex.server.block_table_rows import BlockTableRows, TableRow
from loraplex.server.forward_batch import DecodeStep, ForwardBatch, SequenceChunk
from loraplex.server.host_step import NO_ADAPTER, HostStep
from loraplex.server.layers.metadata import AttentionGroup, ForwardMetadata, lora_meta_arrays


class _Staging:
    """A host array and its device twin, handed out as consecutive views during one step."""

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device, pin: bool) -> None:
        self.host_tensor = torch.zeros(size, dtype=dtype, pin_memory=pin)
        self.host = self.host_tensor.numpy()
        self.device = (
            self.host_tensor if device.type == "cpu" else torch.zeros(size, dtype=dtype, device=device)
        )
        self.used = 0

    def put(self, values: np.ndarray) -> tuple[int, int]:
        start, end = self.used, self.used + values.shape[0]
        if end > self.host.shape[0]:
            raise ValueError(f"step inputs need more than the {self.host.shape[0]} staged entries")
        self.host[start:end] = values
        self.used = end
        return start, end

    def send(self) -> None:
        if self.device is not self.host_tensor and self.used:
            self.device[: self.used].copy_(self.host_tensor[: self.used], non_blocking=True)
        self.used = 0

    def view(self, span: tuple[int, int]) -> torch.Tensor:
        return self.device[span[0] : span[1]]


class StepInputs(NamedTuple):
    """What `ModelRunner.execute` feeds the model; `order[i]` is the i-th run chunk's batch index.

    A tuple: one per step, cheap to make.
    """

    input_ids: torch.Tensor
    meta: ForwardMetadata
    order: tuple[int, ...]
    num_tokens: int
    # Every real token is its chunk's last, in batch order (decode-only): the logits rows are the
    # first len(chunks) rows as they are, no gather needed.
    logits_in_order: bool = False


class BatchBuffers:
    """Builds each step's `StepInputs` into persistent buffers (see the module docstring)."""

    def __init__(
        self,
        *,
        max_seqs: int,
        max_tokens: int,
        max_blocks_per_seq: int,
        block_size: int,
        num_kv_blocks: int,
        num_slots: int,
        device: torch.device,
        attention_backend: str,
        lora_backend: str,
        lora_workspace_per_token: int = 0,
    ) -> None:
        """`lora_workspace_per_token` floats of LoRA workspace per token, for steps of up to max_seqs
        tokens on the Triton backend (decodes; longer steps let each layer allocate its own)."""
        pin = device.type == "cuda"
        self.block_size, self.num_kv_blocks, self.num_slots = block_size, num_kv_blocks, num_slots
        self.max_seqs, self.max_tokens = max_seqs, max_tokens
        self.device = device
        self.attention_backend, self.lora_backend = attention_backend, lora_backend
        self.tables = BlockTableRows(2 * max_seqs + 1, max_blocks_per_seq, device, pin)
        tiles = max_tiles(max_tokens, num_slots)
        self.i64 = _Staging(4 * max_tokens + max_seqs, torch.int64, device, pin)
        self.i32 = _Staging(
            3 * max_tokens + 3 * max_seqs + 3 * num_slots + 3 * tiles + 8, torch.int32, device, pin
        )
        self.step_tables = torch.zeros(max_seqs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self._layout: _Layout | None = None
        self._stale_rows: _DecodeState | None = None  # advanced by `build_decode`, rows not synced yet
        self._ranks_version = 0  # `ranks_changed` calls: a steady decode state is for one version
        # On the CPU the step's block table is written in place (no index_select after a new block).
        # (Through a memoryview: a new block is one entry, and a numpy call costs more.)
        self._host_step_tables = memoryview(self.step_tables.numpy()) if device.type == "cpu" else None
        self.workspace_per_token = lora_workspace_per_token if lora_backend == "triton" else 0
        self.workspace = torch.zeros(max_seqs * self.workspace_per_token, dtype=torch.float32, device=device)

    def build(
        self,
        chunks: Sequence[SequenceChunk],
        slot_ranks: torch.Tensor,
        host_ranks: np.ndarray,
        pad_to: int = 0,
        force_lora: bool = False,
    ) -> StepInputs:
        """Step inputs for `chunks` (decodes run first); `pad_to` pads a decode-only batch with idle rows.

        `force_lora` builds the LoRA grouping even when no token has an adapter (graph capture).

        When the step has the layout of the previous one (the same sequences in the same rows, the
        same adapters, as in steady decoding), only token ids, positions, cache slots and context
        lengths are written again; everything else stays where it is. A decode step of the same
        sequences as the last decode step takes `_steady_decode`, which does that without building
        the per-step arrays at all.
        """
        layout = self._layout
        if self._stale_rows is not None:
            self._sync_rows()
        if layout is not None and layout.decode is not None:
            layout.decode.owner = None  # a `DecodeStep` cannot continue from this step
        if layout is not None and layout.decode is not None and not force_lora:
            steady = self._steady_decode(chunks, layout, layout.decode, host_ranks, pad_to)
            if steady is not None:
                return steady
        order = _run_order(chunks)
        host = self._host_arrays([chunks[i] for i in order], pad_to)
        if host.num_tokens > self.max_tokens or host.num_seqs > self.max_seqs:
            raise ValueError(
                f"{host.num_tokens} tokens / {host.num_seqs} sequences exceed the buffers "
                f"({self.max_tokens} / {self.max_seqs})"
            )
        if layout is not None and not force_lora and layout.matches(host, host_ranks):
            self._restage(host, layout)
        else:
            layout = self._stage(host, order, host_ranks, force_lora)
        decode_only = host.num_decodes == host.num_seqs
        layout.decode = _DecodeState.of(chunks, host, self.tables, pad_to) if decode_only else None
        tables_changed = self.tables.flush()
        self.i64.send()
        self.i32.send()
        if layout.views is None:
            layout.views = self._views(layout.spans, slot_ranks)
        if tables_changed or layout.tables is None:
            rows = layout.views["rows"]
            layout.tables = torch.index_select(
                self.tables.device, 0, rows, out=self.step_tables[: host.num_seqs]
            )
        self._layout = layout
        meta = self._meta(host, layout)
        if layout.decode is not None:
            layout.decode.meta_fields = {
                f.name: getattr(meta, f.name)
                for f in dataclasses.fields(meta)
                if f.name != "attention_groups"
            }
        in_order = layout.decode is not None and host.num_real == host.num_seqs
        return StepInputs(layout.views["ids"], meta, order, host.num_tokens, in_order)

    def _steady_decode(
        self,
        chunks: Sequence[SequenceChunk],
        layout: _Layout,
        state: _DecodeState,
        host_ranks: np.ndarray,
        pad_to: int,
    ) -> StepInputs | None:
        """The next decode step of the last decode step's sequences, in the same order; None: anything else.

        The chunks are read column by column (they are tuples); the staged token ids, positions,
        cache slots and context lengths are rewritten in place, a row gaining a block gets its new
        entry, and the step's metadata reuses the layout's device views.
        """
        if len(chunks) != len(state.seq_ids) or pad_to != state.pad_to:
            return None
        seq_ids, token_ids, cached, _, slots, _, continues = zip(*chunks, strict=True)
        ids = list(itertools.chain.from_iterable(token_ids))
        if (
            seq_ids != state.seq_ids
            or cached != state.next_cached
            or slots != state.slots
            or len(ids) != len(chunks)
            or not all(continues)
            or host_ranks.tobytes() != layout.ranks_bytes
        ):
            return None
        return self._restage_decode(chunks, layout, state, ids, cached)

    def ranks_changed(self) -> None:
        """The adapter ranks (`host_ranks`) changed: the next `build_decode` builds its step anew."""
        self._ranks_version += 1

    def build_decode(
        self,
        step: DecodeStep,
        slot_ranks: torch.Tensor,
        host_ranks: np.ndarray,
        pad_to: int = 0,
        check: Callable[[ForwardBatch], None] | None = None,
    ) -> StepInputs:
        """Step inputs of a steady batch's decode step (see `DecodeStep`).

        When the last step built here was this batch's previous one (same rows, same adapter
        ranks, same padding), the token ids are written, every row's position, cache slot and
        context length move on by one, and only the rows in `step.grown` get a block-table entry;
        no array is built and no torch op runs. Otherwise the step is built from `step.chunks()`
        like any other (after `check` of them). A caller that changes `host_ranks` says so with
        `ranks_changed()`.
        """
        layout = self._layout
        state = layout.decode if layout is not None else None
        if (
            state is not None
            and state.owner is step.layout
            and state.index == step.index - 1
            and state.pad_to == pad_to
            and state.ranks_version == self._ranks_version
        ):
            return self._advance_decode(step, layout, state)  # type: ignore[arg-type]
        batch = step.chunks()
        if check is not None:
            check(batch)
        inputs = self.build(batch.chunks, slot_ranks, host_ranks, pad_to)
        state = self._layout.decode  # type: ignore[union-attr]
        if state is not None:
            state.owner, state.index, state.ranks_version = step.layout, step.index, self._ranks_version
            state.bind(self._layout, self.i64.host, self.i32.host)  # type: ignore[arg-type]
        return inputs

    def _advance_decode(self, step: DecodeStep, layout: _Layout, state: _DecodeState) -> StepInputs:
        n, bs, tables = len(state.seq_ids), self.block_size, self.tables
        if step.num_seqs != n:
            raise ValueError(f"a decode step of {step.num_seqs} rows for a batch of {n}")
        self._stale_rows = state
        tables.begin_step()
        # Item by item through memoryviews: for a few dozen rows this costs less than the first
        # numpy call after a forward pass has flushed the CPU's caches.
        ids, positions, slot_mapping, ctx = state.views  # type: ignore[misc]
        for j, token in enumerate(step.token_ids):
            ids[j] = token
            positions[j] += 1
            slot_mapping[j] += 1
            ctx[j] += 1
        step_tables = self._host_step_tables
        for j, block_id in step.grown:  # a row gains a block once per block_size steps
            row, block = state.rows[j], positions[j] // bs
            if row.num_blocks != block or block >= tables.width or not 0 <= block_id < self.num_kv_blocks:
                raise ValueError(
                    f"sequence {state.seq_ids[j]}: block {block_id} at entry {block} does not fit its row "
                    f"({row.num_blocks} entries of {tables.width}, blocks 0..{self.num_kv_blocks - 1})"
                )
            tables.host_view[row.index, block] = block_id
            row.num_blocks = block + 1
            if step_tables is None:
                tables.mark_dirty(row.index)
            else:
                step_tables[j, block] = block_id
            slot_mapping[j] = block_id * bs
        state.index = step.index
        max_ctx = state.max_ctx = state.max_ctx + 1
        if step_tables is not None:  # on the CPU the "device" buffers are the staged ones: nothing to send
            # `_decode_inputs` when the block tables keep their width (the longest context starts no block):
            if state.inputs is not None and (max_ctx - 1) % bs:
                state.group.move_on(max_ctx)  # type: ignore[union-attr]
                return state.inputs
            return self._decode_inputs(layout, state, state.ctx_padded, max_ctx)
        self.i64.used, self.i32.used = layout.used64, layout.used32
        return self._send_decode(layout, state, state.ctx_padded, state.max_ctx)

    def _sync_rows(self) -> None:
        """Bring the rows `_advance_decode` moved on (without touching them) up to date."""
        state, self._stale_rows = self._stale_rows, None
        context_lens = state.ctx.tolist()  # type: ignore[union-attr]
        step = self.tables.step
        for row, context_len in zip(state.rows, context_lens, strict=True):  # type: ignore[union-attr]
            row.context_len, row.last_step = context_len, step
        state.next_cached = tuple(context_lens)  # type: ignore[union-attr]

    def _restage_decode(
        self,
        chunks: Sequence[SequenceChunk],
        layout: _Layout,
        state: _DecodeState,
        ids: list[int],
        cached: tuple[int, ...],
    ) -> StepInputs:
        spans, h64, h32, n, bs = layout.spans, self.i64.host, self.i32.host, len(ids), self.block_size
        tables = self.tables
        tables.begin_step()
        # The staged values are the last step's: every sequence moved on by one position, so its
        # position, cache slot and context length grow by one, except where a new block starts.
        s, _ = spans["ids"]
        h64[s : s + n] = ids
        s, _ = spans["positions"]
        h64[s : s + n] += 1
        s, _ = spans["slot_mapping"]
        slot_mapping = h64[s : s + n]
        slot_mapping += 1
        s, e = spans["context_lens"]
        ctx = h32[s:e]  # padding rows keep their context of 1
        ctx[:n] += 1
        for j in [j for j, c in enumerate(cached) if c % bs == 0]:  # each row once per block_size steps
            row, block = state.rows[j], cached[j] // bs
            if row.num_blocks <= block:
                tables.write(row, chunks[j], block + 1, bs, self.num_kv_blocks)
            slot_mapping[j] = int(tables.host[row.index, block]) * bs
        state.next_cached = tuple(ctx[:n].tolist())
        step = tables.step
        for row, context_len in zip(state.rows, state.next_cached, strict=True):
            row.context_len, row.last_step = context_len, step
        self.i64.used, self.i32.used = layout.used64, layout.used32
        state.max_ctx = max(state.next_cached)
        return self._send_decode(layout, state, ctx, state.max_ctx)

    def _send_decode(self, layout: _Layout, state: _DecodeState, ctx: np.ndarray, max_ctx: int) -> StepInputs:
        tables_changed = self.tables.flush()
        self.i64.send()
        self.i32.send()
        if tables_changed or layout.tables is None:
            rows = layout.views["rows"]
            layout.tables = torch.index_select(
                self.tables.device, 0, rows, out=self.step_tables[: layout.host.num_seqs]
            )
        return self._decode_inputs(layout, state, ctx, max_ctx)

    def _decode_inputs(
        self, layout: _Layout, state: _DecodeState, ctx: np.ndarray, max_ctx: int
    ) -> StepInputs:
        """The decode step's inputs over the layout's views (its block tables up to date).

        Made once per decode state; every later step hands out the same objects, moved on in
        place: the attention group's longest context and block-table width (see
        `AttentionGroup.move_on`). Every tensor they hold is a view of the persistent buffers.
        """
        width = -(-max_ctx // self.block_size) if layout.host.narrow else self.tables.width
        inputs = state.inputs
        if inputs is not None:
            if width == state.width:
                state.group.move_on(max_ctx)  # type: ignore[union-attr]
            else:
                state.width = width
                state.group.move_on(max_ctx, self._block_tables(layout, state, width))  # type: ignore[union-attr]
            return inputs
        num_seqs = layout.host.num_seqs
        views = layout.views
        group = state.group = AttentionGroup(
            block_tables=self._block_tables(layout, state, width),
            context_lens=views["context_lens"],
            query_starts=views["decode_starts"],
            num_seqs=num_seqs,
            max_query_len=1,
            max_context_len=max(max_ctx, 1),
            token_start=0,
            num_tokens=num_seqs,
            host_context_lens=ctx,  # the staged context lengths, rewritten in place
            host_query_starts=state.query_starts,
        )
        state.width = width
        meta = ForwardMetadata(**state.meta_fields, attention_groups=(group,))
        inputs = StepInputs(views["ids"], meta, state.order, num_seqs, num_seqs == len(state.seq_ids))
        state.inputs = inputs
        return inputs

    @staticmethod
    def _block_tables(layout: _Layout, state: _DecodeState, width: int) -> torch.Tensor:
        block_tables = state.block_tables.get(width)  # views of `step_tables`, rewritten in place
        if block_tables is None:
            block_tables = state.block_tables[width] = layout.tables[:, :width]  # type: ignore[index]
        return block_tables

    def _host_arrays(self, chunks: Sequence[SequenceChunk], pad_to: int) -> HostStep:
        self.tables.begin_step()
        rows, cached, new, slots, ids = [], [], [], [], []
        row_for, bs, nkv = self.tables.row_for, self.block_size, self.num_kv_blocks
        for c in chunks:
            rows.append(row_for(c, bs, nkv))
            cached.append(c.num_cached_tokens)
            new.append(len(c.token_ids))
            slots.append(NO_ADAPTER if c.lora_slot is None else c.lora_slot)
            ids.extend(c.token_ids)
        return HostStep.make(self.tables.host, bs, rows, cached, new, slots, ids, pad_to)

    def _stage(
        self, host: HostStep, order: tuple[int, ...], host_ranks: np.ndarray, force_lora: bool
    ) -> _Layout:
        """Write every field; the dynamic ones first, so a later step of this layout rewrites just those."""
        s64, s32 = self.i64.put, self.i32.put
        spans = {
            "ids": s64(host.ids),
            "positions": s64(host.positions),
            "slot_mapping": s64(host.slot_mapping),
            "context_lens": s32(host.context_lens),
            "logits": s64(host.logits_indices(order)),
            "rows": s32(host.rows),
            "decode_starts": s32(host.query_starts[: host.num_decodes + 1]),
            "prefill_starts": s32(
                host.query_starts[host.num_decodes :] - host.query_starts[host.num_decodes]
            ),
        }
        if force_lora or host.uses_lora(host_ranks):
            lora = lora_meta_arrays(host.token_slots, host_ranks)
            spans.update({f"lora_{name}": s32(values) for name, values in lora.items()})
        return _Layout(host, host_ranks.copy(), spans, self.i64.used, self.i32.used)

    def _restage(self, host: HostStep, layout: _Layout) -> None:
        spans, h64, h32 = layout.spans, self.i64.host, self.i32.host
        for name, values, target in (
            ("ids", host.ids, h64),
            ("positions", host.positions, h64),
            ("slot_mapping", host.slot_mapping, h64),
            ("context_lens", host.context_lens, h32),
        ):
            start, end = spans[name]
            target[start:end] = values
        self.i64.used, self.i32.used = layout.used64, layout.used32

    def _views(self, spans: dict[str, tuple[int, int]], slot_ranks: torch.Tensor) -> dict:
        views = {name: (self.i32 if name in _I32_FIELDS or name.startswith("lora_") else self.i64).view(span)
                 for name, span in spans.items()}  # fmt: skip
        if "lora_token_slots" in spans:
            fields = {name[5:]: view for name, view in views.items() if name.startswith("lora_")}
            views["lora"] = LoraBatchMeta(**fields, slot_ranks=slot_ranks)
        return views

    def _meta(self, host: HostStep, layout: _Layout) -> ForwardMetadata:
        views = layout.views
        workspace = None
        if "lora" in views and self.workspace_per_token and host.num_tokens <= self.max_seqs:
            workspace = self.workspace[: host.num_tokens * self.workspace_per_token]
        groups = _groups(
            host, layout.tables, views["context_lens"], views["decode_starts"], views["prefill_starts"]
        )
        return ForwardMetadata(
            positions=views["positions"],
            slot_mapping=views["slot_mapping"],
            attention_groups=groups,
            logits_indices=views["logits"],
            lora=views.get("lora"),
            block_size=self.block_size,
            attention_backend=self.attention_backend,
            lora_backend=self.lora_backend,
            lora_workspace=workspace,
            padded=host.num_real < host.num_seqs,
        )


_I32_FIELDS = frozenset({"context_lens", "rows", "decode_starts", "prefill_starts"})


@dataclass
class _Layout:
    """What stays the same between steps of one batch layout: the staged spans and their device views."""

    host: HostStep
    ranks: np.ndarray
    spans: dict[str, tuple[int, int]]
    used64: int
    used32: int
    views: dict | None = None
    tables: torch.Tensor | None = None
    decode: _DecodeState | None = None  # set when the layout is decode-only
    ranks_bytes: bytes = b""  # `ranks` as bytes: a steady step compares them with one call

    def __post_init__(self) -> None:
        self.ranks_bytes = self.ranks.tobytes()

    def matches(self, host: HostStep, ranks: np.ndarray) -> bool:
        old = self.host
        return (
            old.num_decodes == host.num_decodes == host.num_seqs
            and old.num_real == host.num_real
            and np.array_equal(old.rows, host.rows)
            and np.array_equal(old.seq_slots, host.seq_slots)
            and np.array_equal(self.ranks, ranks)
        )


@dataclass(slots=True)
class _DecodeState:
    """A decode-only layout's sequences (run order = batch order) and what its steps reuse."""

    seq_ids: tuple[int, ...]
    slots: tuple[int | None, ...]
    next_cached: tuple[int, ...]  # each sequence's cached tokens at its next decode step
    rows: tuple[TableRow, ...]
    row_index: np.ndarray
    pad_to: int
    order: tuple[int, ...]
    query_starts: np.ndarray
    max_ctx: int = 0  # the longest context of the last step built
    meta_fields: dict | None = None  # the first step's metadata fields, all but its attention groups
    block_tables: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)  # by width
    owner: object = None  # the `DecodeStep.layout` whose step `index` this state last built
    index: int = -1
    # Views of the staged values of the real rows (`bind`), which `BatchBuffers._advance_decode` moves on.
    ids: np.ndarray | None = None
    positions: np.ndarray | None = None
    slot_mapping: np.ndarray | None = None
    ctx: np.ndarray | None = None
    ctx_padded: np.ndarray | None = None
    views: tuple[memoryview, ...] = ()  # ids, positions, slot_mapping, ctx
    ranks_version: int = -1
    # The step inputs every step of this state hands out (`BatchBuffers._decode_inputs`), its one
    # attention group and that group's block-table width.
    inputs: StepInputs | None = None
    group: AttentionGroup | None = None
    width: int = 0

    def bind(self, layout: _Layout, h64: np.ndarray, h32: np.ndarray) -> None:
        n, spans = len(self.seq_ids), layout.spans
        self.ids = h64[spans["ids"][0] :][:n]
        self.positions = h64[spans["positions"][0] :][:n]
        self.slot_mapping = h64[spans["slot_mapping"][0] :][:n]
        start, end = spans["context_lens"]
        self.ctx_padded = h32[start:end]
        self.ctx = self.ctx_padded[:n]
        self.views = tuple(memoryview(a) for a in (self.ids, self.positions, self.slot_mapping, self.ctx))

    @classmethod
    def of(
        cls, chunks: Sequence[SequenceChunk], host: HostStep, tables: BlockTableRows, pad_to: int
    ) -> _DecodeState:
        return cls(
            seq_ids=tuple(c.seq_id for c in chunks),
            slots=tuple(c.lora_slot for c in chunks),
            next_cached=tuple(c.num_cached_tokens + 1 for c in chunks),
            rows=tuple(tables.row_of(c.seq_id) for c in chunks),
            row_index=host.rows[: host.num_real].copy(),
            pad_to=pad_to,
            order=tuple(range(len(chunks))),
            query_starts=host.query_starts[: host.num_decodes + 1].copy(),
            max_ctx=int(host.context_lens[: host.num_real].max()),
        )


def _run_order(chunks: Sequence[SequenceChunk]) -> tuple[int, ...]:
    """Decodes first, then the other chunks, each in batch order; ValueError for an empty batch or chunk."""
    lengths = [len(c.token_ids) for c in chunks]
    if not lengths or min(lengths) == 0:
        raise ValueError("a forward batch needs at least one chunk and every chunk at least one token")
    if max(lengths) == 1:
        return tuple(range(len(chunks)))
    return (*(i for i, n in enumerate(lengths) if n == 1), *(i for i, n in enumerate(lengths) if n != 1))


def _groups(
    host: HostStep,
    tables: torch.Tensor,
    context_lens: torch.Tensor,
    decode_starts: torch.Tensor,
    prefill_starts: torch.Tensor,
) -> tuple[AttentionGroup, ...]:
    """The decode group (one query each) first, then the prefill group, as views of the step's tensors."""
    groups = []
    d = host.num_decodes
    bounds = ((0, d, decode_starts), (d, host.num_seqs, prefill_starts))
    for first, end, starts in bounds:
        if end == first:
            continue
        token_start = int(host.query_starts[first])
        group_ctx = host.context_lens[first:end]
        max_ctx = int(group_ctx.max())
        width = -(-max_ctx // host.block_size)
        groups.append(
            AttentionGroup(
                block_tables=tables[first:end, :width] if host.narrow else tables[first:end],
                context_lens=context_lens[first:end],
                query_starts=starts,
                num_seqs=end - first,
                max_query_len=int(host.num_new[first:end].max()),
                max_context_len=max_ctx,
                token_start=token_start,
                num_tokens=int(host.query_starts[end]) - token_start,
                host_context_lens=group_ctx,
                host_query_starts=host.query_starts[first : end + 1] - token_start,
            )
        )
    return tuple(groups)
