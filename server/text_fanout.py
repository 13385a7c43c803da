"""Detokenisation and event fan-out off the engine thread.

The engine thread's step ends with the sampled tokens: it hands the step's events to this
thread and goes on with the next step at once. Here, in order, each event of a request without
stop strings gets its text (the engine made it with `text=""` and a `TextJob`), then every
event goes to its consumer's event loop. Requests with stop strings are detokenised on the
engine thread (a stop string decides when the request ends), their events just pass through
here, so every request's events keep their order.
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


def complete(events: Sequence[TokenEvent], jobs: Sequence[TextJob]) -> list[TokenEvent]:
    """The events with their texts made (in order; each request's detokeniser is used by one thread)."""
    pending = {id(job.event): job for job in jobs}
    return [pending[id(e)].run() if id(e) in pending else e for e in events]


class FanOut:
    """A thread that completes events' texts and delivers them, in submission order."""

    def __init__(self, deliver: Callable[[TokenEvent], None]) -> None:
        self._deliver = deliver
        self._queue: queue.SimpleQueue[tuple[list[TokenEvent], list[TextJob]] | Callable[[], None] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="loraplex-fanout", daemon=True)
        self._thread.start()

    def submit(self, events: list[TokenEvent], jobs: list[TextJob]) -> None:
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
                completed = events
            for event in completed:
                try:
                    self._deliver(event)
                except Exception:
                    log.exception("event delivery failed")
