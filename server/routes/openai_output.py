"""OpenAI response shapes: one `ChoiceWriter` per choice (text, logprobs, usage), and envelopes.

Completions and chat differ in a few names (`_Dialect`); everything else is shared. Shapes
follow vLLM's server: `system_fingerprint` on every envelope, chat deltas that always carry
`role` (and `tool_calls: null`), as TGI's `text-generation` client requires. A completion's
`top_logprobs` hold the chosen token and the `logprobs` best ones (so up to `logprobs + 1`, as
OpenAI documents); with `echo` they start with the prompt's tokens, the first one null.
Log-probabilities below -9999 (-inf) are reported as -9999, as vLLM and OpenAI do (JSON has no -inf).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraplex.server.request import FinishReason, PromptTokenLogprob, TokenEvent, TokenLogprob
from loraplex.server.routes.generation import StopTextFilter

FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}
SYSTEM_FINGERPRINT = "loraplex"
MIN_LOGPROB = -9999.0
PromptEntries = tuple[PromptTokenLogprob | None, ...]


@dataclass(frozen=True)
class EchoedPrompt:
    """The prompt's tokens and log-probabilities, listed before the generated ones (`echo` + `logprobs`)."""

    token_ids: tuple[int, ...]
    entries: PromptEntries
    num_top: int


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

    def logprobs(self, events: list[TokenEvent], echoed: EchoedPrompt | None = None) -> dict[str, Any] | None:
        if not self._show_logprobs:
            return None
        tokens = [e for e in events if e.token_id is not None]
        if self._dialect.chat:
            return {"content": [_chat_logprob(self._decode, e) for e in tokens]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if echoed is not None:
            for token_id, entry in zip(echoed.token_ids, echoed.entries, strict=True):
                if entry is None:
                    self._add(out, token_id, None, None)
                else:
                    self._add(
                        out,
                        token_id,
                        entry.logprob,
                        [TokenLogprob(token_id, entry.logprob), *entry.top[: echoed.num_top]],
                    )
        for e in tokens:
            self._add(out, e.token_id, e.logprob, [TokenLogprob(e.token_id, e.logprob), *e.top_logprobs])  # type: ignore[arg-type]
        return out

    def _add(
        self, out: dict[str, list], token_id: int, logprob: float | None, top: list[TokenLogprob] | None
    ) -> None:
        text = self._decode([token_id])
        out["tokens"].append(text)
        out["token_logprobs"].append(None if logprob is None else max(logprob, MIN_LOGPROB))
        out["top_logprobs"].append(
            None if top is None else {self._decode([a.token_id]): max(a.logprob, MIN_LOGPROB) for a in top}
        )
        out["text_offset"].append(self._offset)
        self._offset += len(text)

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


def vllm_prompt_logprobs(
    entries: PromptEntries, decode: Callable[[list[int]], str], num_top: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: per position, token id -> {logprob, rank, decoded_token}; the
    prompt's own token first, then the `num_top` most likely ones (ranks 1..num_top)."""

    def position(entry: PromptTokenLogprob) -> dict[str, dict[str, Any]]:
        ranked = [(entry.token_id, entry.logprob, entry.rank)]
        ranked += [(a.token_id, a.logprob, rank) for rank, a in enumerate(entry.top[:num_top], start=1)]
        out: dict[str, dict[str, Any]] = {}
        for token_id, logprob, rank in ranked:
            out.setdefault(
                str(token_id),
                {"logprob": max(logprob, MIN_LOGPROB), "rank": rank, "decoded_token": decode([token_id])},
            )
        return out

    return [None if entry is None else position(entry) for entry in entries]
