"""OpenAI response shapes: one `ChoiceWriter` per choice (text, logprobs, usage), and envelopes.

Completions and chat differ in a few names (`_Dialect`); everything else is shared. Shapes
follow vLLM's server: `system_fingerprint` on every envelope, chat deltas that always carry
`role` (and `tool_calls: null`), as TGI's `text-generation` client requires.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraplex.server.request import FinishReason, TokenEvent
from loraplex.server.routes.generation import StopTextFilter

FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}
SYSTEM_FINGERPRINT = "loraplex"


@dataclass(frozen=True)
class Dialect:
    """What differs between completions and chat: ids, object names, chunk shapes."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool


COMPLETION = Dialect("cmpl-", "text_completion", "text_completion", chat=False)
CHAT = Dialect("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)


class ChoiceWriter:
    """One choice's text (stop strings cut, also when streaming), logprobs and token count."""

    def __init__(
        self, index: int, dialect: Dialect, decode: Callable[[list[int]], str], stops: tuple[str, ...],
        show_logprobs: bool, num_prompt_tokens: int,
    ) -> None:  # fmt: skip
        self.index = index
        self._dialect = dialect
        self._decode = decode
        self._stops = StopTextFilter(stops)
        self._show_logprobs = show_logprobs
        self._offset = 0
        self.num_prompt_tokens = num_prompt_tokens
        self.num_generated = 0

    def text_of(self, event: TokenEvent) -> str:
        if event.token_id is not None:
            self.num_generated += 1
        text = self._stops.push(event.text)
        return text + self._stops.flush() if event.finish_reason is not None else text

    def logprobs(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        if not self._show_logprobs:
            return None
        tokens = [e for e in events if e.token_id is not None]
        if self._dialect.chat:
            return {"content": [_chat_logprob(self._decode, e) for e in tokens]}
        texts = [self._decode([e.token_id]) for e in tokens]  # type: ignore[list-item]
        offsets = []
        for text in texts:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in tokens],
            "top_logprobs": [{self._decode([a.token_id]): a.logprob for a in e.top_logprobs} for e in tokens],
            "text_offset": offsets,
        }

    def choice(self, text: str, logprobs: dict[str, Any] | None, finish: FinishReason | None) -> dict:
        finish_reason = FINISH.get(finish) if finish is not None else None
        if not self._dialect.chat:
            return {"index": self.index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": self.index, "logprobs": logprobs, "finish_reason": finish_reason}

    def usage(self) -> dict[str, int]:
        return usage(self.num_prompt_tokens, self.num_generated)


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chat_delta(text: str | None, first: bool) -> dict[str, Any]:
    delta: dict[str, Any] = {"role": "assistant", "content": text, "tool_calls": None}
    if first:
        delta["content"] = text or ""
    return delta


class Envelope:
    """The fields around `choices` that every chunk and response of one request repeats."""

    def __init__(self, request_id: str, model: str, dialect: Dialect) -> None:
        self.id = dialect.id_prefix + request_id
        self.model = model
        self.created = int(time.time())
        self._dialect = dialect

    def __call__(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._dialect.chunk_object if chunk else self._dialect.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }


def _chat_logprob(decode: Callable[[list[int]], str], event: TokenEvent) -> dict[str, Any]:
    token = decode([event.token_id])  # type: ignore[list-item]
    return {
        "token": token,
        "logprob": event.logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": (t := decode([a.token_id])), "logprob": a.logprob, "bytes": list(t.encode())}
            for a in event.top_logprobs
        ],
    }
