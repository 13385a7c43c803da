"""Heavy request work off the event loop: a small worker pool with a bounded queue.

Tokenising a long prompt, rendering a chat template or parsing a large JSON body takes
milliseconds to seconds of CPU; on the event loop it would stall every stream and the probes
(a liveness probe that times out restarts the pod). The HF fast tokenizer releases the GIL
while it encodes, so worker threads keep the loop responsive. The queue is bounded: past
`max_pending` jobs (at most one body limit of memory each) a request gets 429 instead of
waiting without limit.

The body limit is tied to `MAX_INPUT_TOKENS`: a body longer than `body_limit(max_input_tokens)`
cannot hold a prompt that fits (docs/errors.md), so it is refused (413) before it is read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

from loraplex.server.app_priority import started_pool
from loraplex.server.engine_api import QueueFullError

T = TypeVar("T")

BODY_BYTES_PER_TOKEN = 64  # generous: English averages ~4 bytes a token, JSON-escaped CJK ~12
BODY_OVERHEAD_BYTES = 64 * 1024  # field names, sampling parameters, chat message wrappers
# Past ~8 MiB, `json.loads` (C code: it holds the GIL, whatever thread runs it) alone stalls the
# loop for over 25 ms, 60-130 ms at 32 MiB. 8 MiB still fits 130k tokens at 64 bytes each
# (TGI's default payload limit is 2 MB).
MAX_BODY_BYTES = 8 * 1024 * 1024
INLINE_JSON_BYTES = 64 * 1024  # smaller bodies are parsed on the loop (well under a millisecond)


def body_limit(max_input_tokens: int) -> int:
    """The largest request body accepted, in bytes."""
    return min(MAX_BODY_BYTES, BODY_OVERHEAD_BYTES + BODY_BYTES_PER_TOKEN * max(1, max_input_tokens))


class BlockingPool:
    """`await pool.run(fn, *args)`: `fn` in a worker thread; QueueFullError (429) when too many wait."""

    def __init__(self, max_workers: int = 2, max_pending: int = 512) -> None:
        self._executor = started_pool(max_workers, "loraplex-http")  # threads started up front
        self._max_pending = max_pending
        self._pending = 0

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        if self._pending >= self._max_pending:
            raise QueueFullError(f"{self._pending} requests are being tokenized; retry shortly")
        self._pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)
        finally:
            self._pending -= 1

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
