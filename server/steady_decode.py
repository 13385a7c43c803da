"""A steady decode batch: the same running sequences decoding step after step, kept as columns.

Most steps of a busy server decode exactly the sequences of the step before, in the same
order. For those the engine skips the per-sequence plan (`ScheduledStep`, `SequenceChunk`s,
`SampledToken`s, one `TokenEvent` each): what does not change while the batch stays the same
(request ids, detokenisers, append methods, which rows need the slow path) is gathered here
once, and what changes per step is derived from the step index:

- a row's next token starts a new KV block when its position is a multiple of the block size;
  positions all move on by one per step, so the rows are grouped once by position modulo the
  block size and each step looks up one group (`grown_rows`), likewise the rows whose block fills
  up (`full_rows`, for the prefix cache);
- a row can only end by length once the step countdown `steps_to_limit` runs out, and by a stop
  token only when one of `stop_ids` was sampled (one set test for the whole batch).

Rows that always take the per-row path (`always_special`): requests with stop strings (their
text decides when they end, so it is made on the engine thread) or prompt logprobs, and every
row when the engine does not defer text.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any


class SteadyBatch:
    """Columns of a decode-only batch (`states`: the engine's request states, in batch order)."""

    __slots__ = (
        "_by_phase",
        "always_special",
        "appends",
        "base_generated",
        "block_size",
        "forward_batch",
        "index",
        "next_ids",
        "num_prompt_tokens",
        "outputs",
        "request_ids",
        "rows",
        "seqs",
        "states",
        "steps_to_limit",
        "stop_ids",
        "version",
    )

    def __init__(
        self,
        states: Iterable[Any],
        version: int,
        block_size: int,
        eos_token_ids: frozenset[int],
        defer_text: bool,
    ) -> None:
        self.states = tuple(states)
        self.version = version  # the scheduler's, when `running` was these sequences
        seqs = self.seqs = tuple(s.seq for s in self.states)
        self.rows = tuple(s.sampling_row for s in self.states)
        self.request_ids = tuple(s.request.request_id for s in self.states)
        self.num_prompt_tokens = tuple(seq.num_prompt_tokens for seq in seqs)
        # Generated tokens after the first step: `TokenBatch` adds the step index.
        self.base_generated = tuple(len(seq.token_ids) - seq.num_prompt_tokens + 1 for seq in seqs)
        self.outputs = tuple(s.output for s in self.states)
        self.appends: tuple[Callable[[int], None], ...] = tuple(seq.token_ids.append for seq in seqs)
        self.always_special = frozenset(
            j
            for j, s in enumerate(self.states)
            if not defer_text or s.has_stop_strings or s.seq.prompt_logprobs is not None
        )
        stop: set[int] = set()
        for s in self.states:
            stop.update(s.request.params.stop_token_ids)
            if not s.request.params.ignore_eos:
                stop.update(eos_token_ids)
        self.stop_ids = frozenset(stop)
        # Steps until the first row reaches its length limit (it ends in the step where this is 1).
        self.steps_to_limit = min(s.length_limit - len(s.seq.token_ids) for s in self.states)
        self.block_size = block_size
        self._by_phase: list[list[int]] = [[] for _ in range(block_size)]
        for j, seq in enumerate(seqs):  # the position of its next token is num_cached_tokens
            self._by_phase[seq.num_cached_tokens % block_size].append(j)
        self.index = 0  # the next step's
        self.next_ids: list[int] = [seq.token_ids[-1] for seq in seqs]
        # The step as a `ForwardBatch` (`DecodeStep.chunks`), set by the engine that makes the batch.
        self.forward_batch: Callable[[], Any] | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.seqs)

    def grown_rows(self) -> list[int]:
        """Rows whose token of this step starts a new block (position % block_size == 0)."""
        return self._by_phase[-self.index % self.block_size]

    def full_rows(self) -> list[int]:
        """Rows whose block this step's token fills (position % block_size == block_size - 1)."""
        return self._by_phase[(self.block_size - 1 - self.index) % self.block_size]

    def special_rows(self, tokens: list[int]) -> frozenset[int] | set[int]:
        """Rows of this step's `tokens` that take the per-row path: always-special, failed (-1),
        a stop token or EOS sampled, or the length limit reached."""
        special = self.always_special
        extra: set[int] | None = None
        if min(tokens) < 0:
            extra = {j for j, t in enumerate(tokens) if t < 0}
        if self.stop_ids and not self.stop_ids.isdisjoint(tokens):
            stop = self.stop_ids
            extra = (extra or set()) | {j for j, t in enumerate(tokens) if t in stop}
        if self.steps_to_limit <= 1:
            ending = {j for j, s in enumerate(self.states) if len(s.seq.token_ids) + 1 >= s.length_limit}
            extra = (extra or set()) | ending
        return special if extra is None else special | extra
