"""Prompt log-probabilities of one sequence, gathered chunk by chunk over its prefill (pure policy).

Position `p`'s entry is the model's log-probability of prompt token `p` given tokens `0 .. p-1`,
read from the logits of position `p - 1`; position 0 has none (vLLM and TGI return null there).
A prefill chunk over positions `c .. c+n-1` therefore scores prompt tokens `c+1 .. c+n` (those
still in the prompt). Every position must be computed, so such a sequence reads nothing from the
prefix cache (vLLM does the same): cached blocks have K/V but no logits. A sequence preempted
before its prefill ends recomputes its prompt and overwrites what it had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from loraplex.server.request import PromptTokenLogprob


@dataclass(frozen=True)
class PromptScoring:
    """What the model runner scores for one chunk of a step: the logits of the chunk's first
    `len(target_ids)` positions against the prompt tokens that follow each of them."""

    chunk_index: int  # in the step's batch order
    num_top: int  # alternatives per position
    target_ids: tuple[int, ...]  # prompt tokens at positions start+1 .. start+len(target_ids)


class PromptLogprobs:
    """One sequence's prompt log-probabilities until they are handed out (once)."""

    def __init__(self, num_top: int, num_prompt_tokens: int) -> None:
        self.num_top = num_top
        self._entries: list[PromptTokenLogprob | None] = [None] * num_prompt_tokens
        self._missing = set(range(1, num_prompt_tokens))
        self.is_delivered = False

    def scoring(
        self, chunk_index: int, token_ids: Sequence[int], start: int, num_new: int
    ) -> PromptScoring | None:
        """The scoring of a chunk at positions `start .. start+num_new-1`, None if it scores nothing."""
        end = min(start + num_new + 1, len(self._entries))
        if self.is_delivered or start + 1 >= end:
            return None
        return PromptScoring(chunk_index, self.num_top, tuple(token_ids[start + 1 : end]))

    def record(self, start: int, entries: Sequence[PromptTokenLogprob]) -> None:
        """The scores of a chunk that started at position `start` (from `scoring`)."""
        for offset, entry in enumerate(entries, start=start + 1):
            self._entries[offset] = entry
            self._missing.discard(offset)

    def take(self) -> tuple[PromptTokenLogprob | None, ...] | None:
        """Every position's entry, once all are computed; None before that and after the first time."""
        if self.is_delivered or self._missing:
            return None
        self.is_delivered = True
        return tuple(self._entries)
