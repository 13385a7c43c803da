"""Token ids to streamed text: incremental, UTF-8 safe, with stop strings.

Decoding one token at a time is wrong for byte-level BPE (a character may span tokens) and
for SentencePiece (a token's leading space depends on its neighbour), so each step decodes a
small window and emits only what became stable, as TGI does. Text that might be the start
of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first outputs, for correct leading spaces


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def push(self, token_id: int) -> str:
        """Add a generated token; return the text that became final (may be "")."""
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next byte
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """At the end: whatever is still pending, replacement characters included."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :]


class OutputText:
    """A request's generated text with stop strings: what may be streamed so far."""

    def __init__(self, detokenizer: IncrementalDetokenizer, stop: Sequence[str] = ()) -> None:
        self._detokenizer = detokenizer
        self._stop = tuple(s for s in stop if s)
        self.text = ""
        self._num_emitted = 0
        self.stopped = False  # a stop string matched; `text` ends just before it

    def append(self, token_id: int) -> str:
        """Add a token; return the next streamable piece. Sets `stopped` on a stop string."""
        return self._advance(self._detokenizer.push(token_id), final=False)

    def finish(self) -> str:
        """The request ended: release held-back and pending text."""
        return self._advance(self._detokenizer.flush(), final=True)

    def _advance(self, delta: str, final: bool) -> str:
        if self.stopped:
            return ""
        start = max(0, len(self.text) - max((len(s) for s in self._stop), default=0))
        self.text += delta
        hits = [i for i in (self.text.find(s, start) for s in self._stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[: min(hits)], True
            final = True
        end = len(self.text) if final else len(self.text) - self._held_back()
        piece = self.text[self._num_emitted : end]
        self._num_emitted = max(self._num_emitted, end)
        return piece

    def _held_back(self) -> int:
        """Length of the longest end of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest
