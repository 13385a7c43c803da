"""One request's life inside the engine: its tokens, KV blocks and progress (pure policy)."""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loraplex.server.prompt_logprobs import PromptLogprobs
from loraplex.server.request import FinishReason
from loraplex.server.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(frozen=True)
class AdapterRef:
    """The adapter version a sequence runs with. `generation` changes on every (re)load, so
    cached KV of an older load is never reused (it keys the prefix cache)."""

    name: str
    generation: int


_seq_ids = itertools.count()


class Sequence:
    """Token ids (prompt + generated) and how many of them already have K/V in the cache.

    `num_cached_tokens` counts positions whose K/V are computed; the scheduler asks for the
    next `num_tokens - num_cached_tokens` (prefill chunks, then one token per decode step).
    Preemption by recompute simply resets it to 0 and drops the block table.
    """

    # Slots: a decode step touches every running sequence (a compact object, attributes by offset);
    # `__weakref__`: the metrics keep a weak set of the sequences they have seen.
    __slots__ = (
        "__weakref__",
        "adapter",
        "arrival",
        "block_table",
        "finish_reason",
        "lora_slot",
        "num_cached_tokens",
        "num_preemptions",
        "num_prefix_hit_tokens",
        "num_prompt_tokens",
        "params",
        "prompt_leader",
        "prompt_logprobs",
        "request_id",
        "seq_id",
        "status",
        "token_ids",
    )

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: tuple[int, ...] | list[int],
        params: SamplingParams,
        adapter: AdapterRef | None = None,
        arrival: float = 0.0,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.params = params
        self.adapter = adapter
        self.arrival = arrival
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        self.status = SequenceStatus.WAITING
        self.finish_reason: FinishReason | None = None
        self.lora_slot: int | None = None  # set while the sequence holds an adapter slot
        self.num_preemptions = 0
        self.num_prefix_hit_tokens = 0  # tokens served from the prefix cache at last admission
        self.prompt_leader: Sequence | None = None  # a sibling whose prompt K/V this one will reuse
        self.prompt_logprobs: PromptLogprobs | None = (
            None
            if params.prompt_logprobs is None
            else PromptLogprobs(params.prompt_logprobs, len(prompt_token_ids))
        )

    def __len__(self) -> int:
        return len(self.token_ids)

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, tokens={len(self)}, "
            f"cached={self.num_cached_tokens}, status={self.status.name})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_cached_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def adapter_name(self) -> str | None:
        return self.adapter.name if self.adapter else None

    @property
    def is_prompt_computed(self) -> bool:
        return self.num_cached_tokens >= self.num_prompt_tokens

    @property
    def awaits_prompt_leader(self) -> bool:
        """Whether admitting it now would compute the prompt a sibling is computing (see `prompt_leader`)."""
        leader = self.prompt_leader
        return leader is not None and not leader.is_finished and not leader.is_prompt_computed

    @property
    def reads_prefix_cache(self) -> bool:
        """False while its prompt log-probabilities are still to compute: cached blocks have no logits."""
        return self.prompt_logprobs is None or self.prompt_logprobs.is_delivered

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def reset_for_recompute(self) -> None:
        """Preemption: forget cached K/V (the block manager already freed the blocks)."""
        self.num_cached_tokens = 0
        self.block_table = []
        self.status = SequenceStatus.WAITING
        self.num_preemptions += 1


class GeneratedTokens:
    """A live read-only view of a sequence's generated token ids (what follows its prompt): the
    sampler's penalties read it, and nothing appends each token twice."""

    __slots__ = ("_seq",)

    def __init__(self, seq: Sequence) -> None:
        self._seq = seq

    def __len__(self) -> int:
        return len(self._seq.token_ids) - self._seq.num_prompt_tokens

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            offset = self._seq.num_prompt_tokens
            return (
                self._seq.token_ids[offset + start : offset + stop : step] if step == 1 else list(self)[key]
            )
        return self._seq.token_ids[self._seq.num_prompt_tokens + range(len(self))[key]]

    def __iter__(self) -> Iterator[int]:
        return iter(self._seq.token_ids[self._seq.num_prompt_tokens :])

    def __repr__(self) -> str:
        return f"GeneratedTokens({list(self)!r})"
