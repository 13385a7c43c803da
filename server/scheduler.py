"""Continuous batching: which sequences run this step and how many of their tokens (pure policy).

Each step first continues the running sequences (decodes and unfinished prefill chunks,
oldest first), then admits waiting ones in arrival order, all under one token budget, so
long prompts are prefilled in chunks between other requests' decode steps. When KV blocks
run out a running sequence is preempted by recompute: its blocks are freed (the prefix cache
usually keeps them) and it goes back to the front of the queue with its tokens so far.

Adapters: a sequence holds its adapter's GPU slot while it runs, so a step never holds more
distinct adapters than slots. A waiting request whose adapter cannot get a slot does not
block requests of other adapters behind it; to keep it from starving, one resident adapter
is chosen to *drain* (no new admissions) until a slot frees up for it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.server.block_manager import BlockManager
from loraplex.server.request import FinishReason
from loraplex.server.sequence import AdapterRef, Sequence, SequenceStatus


class SlotAllocator(Protocol):
    """The slice of the adapter registry the scheduler needs."""

    def can_acquire_slot(self, ref: AdapterRef) -> bool: ...

    def acquire_slot(self, ref: AdapterRef) -> int: ...

    def release_slot(self, ref: AdapterRef) -> None: ...

    def slot_users(self) -> dict[AdapterRef, int]: ...  # resident, evictable -> running users


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64  # running sequences at once
    max_batch_tokens: int = 2048  # tokens per step, prefill chunks and decodes together

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_batch_tokens < 1:
            raise ValueError("max_num_seqs and max_batch_tokens must be >= 1")


@dataclass
class ScheduledStep:
    """The plan for one step: `(sequence, number of new tokens)` in batch order."""

    chunks: list[tuple[Sequence, int]] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.chunks

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager, slots: SlotAllocator) -> None:
        self.config = config
        self.block_manager = block_manager
        self.slots = slots
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self._draining: AdapterRef | None = None  # resident adapter admitting nothing new
        self.num_preemptions = 0
        # Changes whenever `running` may have changed (a step scheduled, a sequence finished): a
        # caller that saw `running` at one version knows it is the same at that version.
        self.version = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        if self.block_manager.num_blocks_for(seq.num_tokens + 1) > self.block_manager.num_blocks:
            raise ValueError(f"{seq} can never fit in {self.block_manager.num_blocks} KV blocks")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        self.version += 1
        step = ScheduledStep()
        budget = self._schedule_running(step, self.config.max_batch_tokens)
        if step.preempted:  # memory is short: let the running ones finish first
            self.waiting.extendleft(reversed(step.preempted))  # back first, in their order
        else:
            self._schedule_waiting(step, budget)
        return step

    def _schedule_running(self, step: ScheduledStep, budget: int) -> int:
        queue, kept = deque(self.running), deque()
        can_append, may_append = self.block_manager.can_append, self.block_manager.may_append  # per sequence
        while queue:
            seq = queue.popleft()
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                kept.append(seq)  # out of budget this step; stays running
                continue
            while not can_append(seq, num_new):
                victim = queue.pop() if queue else seq  # the youngest gives way
                self._preempt(victim, step)
                if victim is seq:
                    break
            else:
                may_append(seq, num_new)
                step.chunks.append((seq, num_new))
                kept.append(seq)
                budget -= num_new
        self.running = kept
        return budget

    def _preempt(self, seq: Sequence, step: ScheduledStep) -> None:
        self._release(seq)
        seq.reset_for_recompute()
        step.preempted.append(seq)
        self.num_preemptions += 1

    def _schedule_waiting(self, step: ScheduledStep, budget: int) -> None:
        for seq in list(self.waiting):
            if budget == 0 or len(self.running) >= self.config.max_num_seqs:
                break
            if seq.awaits_prompt_leader:
                continue  # its prompt's blocks are being computed by a sibling (n > 1)
            if seq.adapter is not None and not self._may_take_slot(seq.adapter):
                continue  # other adapters behind it may still run
            num_cached = self.block_manager.num_cached_prefix_tokens(seq)
            num_new = min(seq.num_tokens - num_cached, budget)
            if not self.block_manager.can_allocate(seq, num_new):
                break  # out of KV space: keep arrival order
            self.block_manager.allocate(seq, num_new)
            if seq.adapter is not None:
                seq.lora_slot = self.slots.acquire_slot(seq.adapter)
            seq.status = SequenceStatus.RUNNING
            self.waiting.remove(seq)
            self.running.append(seq)
            step.chunks.append((seq, num_new))
            budget -= num_new

    def _may_take_slot(self, ref: AdapterRef) -> bool:
        users = self.slots.slot_users()
        if ref in users:
            return ref != self._draining
        if self.slots.can_acquire_slot(ref):
            self._draining = None  # a slot is free again: the oldest blocked request takes it
            return True
        if users and (self._draining is None or self._draining not in users):
            # The resident adapter with the fewest running sequences frees a slot soonest.
            self._draining = min(users, key=lambda r: (users[r], r.name, r.generation))
        return False

    def repeats_decodes(self, version: int, num_seqs: int) -> bool:
        """Whether `schedule()` would plan one decode token for each running sequence, in order, and
        nothing else, given that at `version` all `num_seqs` of them were decoding (`running` is
        the same): the budget holds them and nobody waiting could be admitted."""
        return (
            version == self.version
            and num_seqs <= self.config.max_batch_tokens
            and (
                not self.waiting
                or num_seqs >= self.config.max_num_seqs
                or num_seqs == self.config.max_batch_tokens
            )
        )

    def extend_decodes(self, seqs: tuple[Sequence, ...], rows: list[int]) -> bool:
        """The step of `repeats_decodes`: a new block for each of `seqs[rows]` (whose next token starts
        one); False, nothing changed, when blocks are short (`schedule()` would preempt)."""
        if not rows:
            return True
        block_manager = self.block_manager
        if block_manager.num_free_blocks < len(rows):
            return False
        for j in rows:
            block_manager.may_append(seqs[j], 1)
        return True

    def commit_decodes(
        self,
        seqs: tuple[Sequence, ...],
        full_rows: list[int],
        appends: tuple[Callable[[int], None], ...] = (),
        tokens: list[int] | None = None,
    ) -> None:
        """`update_after_step` of a decode step of `seqs`; `full_rows`: those whose last block just filled up.

        With `appends` and `tokens`, `appends[i](tokens[i])` too, in the same pass (the engine's
        new tokens; the prefix cache below only hashes positions before them).
        """
        if tokens is None:
            for seq in seqs:
                seq.num_cached_tokens += 1
        else:
            for seq, append, token in zip(seqs, appends, tokens, strict=True):
                seq.num_cached_tokens += 1
                append(token)
        if self.block_manager.enable_prefix_caching:
            for j in full_rows:
                self.block_manager.commit(seqs[j])

    def update_after_step(self, step: ScheduledStep) -> None:
        """The model ran `step`: its tokens now have K/V in the cache."""
        for seq, num_new in step.chunks:
            seq.num_cached_tokens += num_new
            self.block_manager.commit(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """Take `seq` out (finished, aborted), freeing its blocks and its slot."""
        self.version += 1
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._release(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def _release(self, seq: Sequence) -> None:
        self.block_manager.deallocate(seq)
        if seq.adapter is not None and seq.lora_slot is not None:
            self.slots.release_slot(seq.adapter)
        seq.lora_slot = None
