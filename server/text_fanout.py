"""Detokenisation and event fan-out off the engine thread.

The engine thread's step ends with the sampled tokens: it hands the step's events to this
thread and goes on with the next step at once. Here, in order, each event of a request without
stop strings gets its text (the engine made it with `text=""` and a `TextJob`), then every
event goes to its consumer's event loop. Requests with stop strings are detokenised on the
engine thread (a stop string decides when the request ends), their events just pass through
here, so every request's events keep their order. A steady decode step hands over its events
as one `TokenBatch` (columns), which is expanded into per-request events here too.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import NamedTuple

from loraplex.server.detokenizer import OutputText
from loraplex.server.request import TokenEvent

log = logging.getLogger(__name__)


class TextJob(NamedTuple):
    """What is left to do for `event`'s text: append `token_id` (None: nothing), then maybe finish.

    A tuple: the engine makes one per request per step.
    """

    event: TokenEvent
    output: OutputText
    token_id: int | None
    finish: bool

    def run(self) -> TokenEvent:
        text = self.output.append(self.token_id) if self.token_id is not None else ""
        if self.finish:
            text += self.output.finish()
        return dataclasses.replace(self.event, text=text)


class TokenBatch(NamedTuple):
    """One steady decode step's events as columns: row `i` is request `request_ids[i]`'s token `token_ids[i]`.

    The engine makes one per step instead of one event per request (a tuple: cheap to make);
    `events()` expands it (on the fan-out thread). Row `i` of a request that goes on without stop strings gets its text here,
    from `outputs[i]`; rows in `special` (finished, failed, with stop strings or prompt logprobs)
    come as the event the engine made for them. The tuples are shared by every step of the batch;
    `num_generated_tokens` of row `i` is `base_generated[i] + step`.
    """

    request_ids: tuple[str, ...]
    token_ids: list[int]
    num_prompt_tokens: tuple[int, ...]
    base_generated: tuple[int, ...]
    step: int
    outputs: tuple[OutputText, ...]
    special: dict[int, TokenEvent]

    @property
    def num_rows(self) -> int:
        return len(self.token_ids)

    def events(self, text: bool = True) -> list[TokenEvent]:
        """One event per row, in row order; texts made (each request's detokeniser is used by one
        thread), or all "" with `text=False`."""
        special, k = self.special, self.step
        outputs = self.outputs if text else (_NO_TEXT,) * len(self.token_ids)
        rows = zip(
            self.request_ids,
            self.token_ids,
            outputs,
            self.num_prompt_tokens,
            self.base_generated,
            strict=True,
        )
        if not special:
            return [
                TokenEvent(rid, token, output.append(token), num_prompt_tokens=p, num_generated_tokens=g + k)
                for rid, token, output, p, g in rows
            ]
        return [
            special[i]
            if i in special
            else TokenEvent(rid, token, output.append(token), num_prompt_tokens=p, num_generated_tokens=g + k)
            for i, (rid, token, output, p, g) in enumerate(rows)
        ]


class _NoText:
    @staticmethod
    def append(token_id: int) -> str:
        return ""


_NO_TEXT = _NoText()

StepOutput = TokenEvent | TokenBatch  # what a step hands out: events, and batches of them


def expand(items: Sequence[StepOutput], text: bool = True) -> list[TokenEvent]:
    """The events of `items`, batches expanded (their texts made unless `text` is False), in order."""
    if len(items) == 1 and isinstance(items[0], TokenBatch):
        return items[0].events(text)
    events: list[TokenEvent] = []
    for item in items:
        if isinstance(item, TokenBatch):
            events += item.events(text)
        else:
            events.append(item)
    return events


def complete(items: Sequence[StepOutput], jobs: Sequence[TextJob]) -> list[TokenEvent]:
    """The events with their texts made (in order; each request's detokeniser is used by one thread)."""
    events = expand(items)
    if not jobs:
        return events
    pending = {id(job.event): job for job in jobs}
    return [pending[id(e)].run() if id(e) in pending else e for e in events]


class FanOut:
    """A thread that completes events' texts and delivers them, in submission order."""

    def __init__(self, deliver: Callable[[TokenEvent], None]) -> None:
        self._deliver = deliver
        self._queue: queue.SimpleQueue[
            tuple[Sequence[StepOutput], list[TextJob]] | Callable[[], None] | None
        ] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="loraplex-fanout", daemon=True)
        self._thread.start()

    def submit(self, events: Sequence[StepOutput], jobs: list[TextJob]) -> None:
        if events:
            self._queue.put((events, jobs))

    def call(self, fn: Callable[[], None]) -> None:
        """Run `fn` here once everything submitted before it was delivered (now, once closed)."""
        if self._closed:
            fn()
        else:
            self._queue.put(fn)

    def close(self) -> None:
        """Deliver what was submitted, then stop."""
        self._queue.put(None)
        self._thread.join()
        self._closed = True

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if callable(item):
                try:
                    item()
                except Exception:
                    log.exception("fan-out call failed")
                continue
            events, jobs = item
            try:
                completed = complete(events, jobs)
            except Exception:  # a tokenizer failure must not silence every stream
                log.exception("detokenisation failed; events go out without their text")
                completed = expand(events, text=False)
            for event in completed:
                try:
                    self._deliver(event)
                except Exception:
                    log.exception("event delivery failed")
