"""What TGI and OpenAI routes share: adapter names, tokenizing, one engine stream per request."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from aiohttp import web

from loraplex.server.auth import caller_of
from loraplex.server.engine_api import Engine, EngineError, InvalidRequestError, UnknownAdapterError
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.routes.context import ServerContext
from loraplex.server.routes.errors import ApiError

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # proxies (nginx, GKE L7) must not buffer token streams
}


def resolve_adapter(ctx: ServerContext, name: str | None) -> str | None:
    """The served adapter name for a name or alias; None means the base model (its served name,
    or the model id it was started from).

    An unknown name is an error (404): a request for a fine-tune must never be answered by the
    base model.
    """
    engine = ctx.engine
    if not name or name in (engine.model_name, ctx.settings.model_id):
        return None
    with contextlib.suppress(UnknownAdapterError):
        info = engine.get_adapter(name)
        return _servable(info.name, info.state, info.error)
    for info in engine.list_adapters():
        if name in info.aliases:
            return _servable(info.name, info.state, info.error)
    raise UnknownAdapterError(f"adapter {name!r} is not loaded on this server")


def authorize_adapter(http: web.Request, ctx: ServerContext, adapter: str | None) -> None:
    """401/403 unless the caller may use `adapter` (a served name from `resolve_adapter`)."""
    ctx.access.check(caller_of(http), adapter)


def _servable(name: str, state: str, error: str | None) -> str:
    if state == "failed":
        raise UnknownAdapterError(f"adapter {name!r} failed to load: {error}")
    if state == "loading":  # known and on its way: worth a retry, unlike an unknown name
        raise ApiError(
            503, f"adapter {name!r} is still loading", "adapter_loading", headers={"Retry-After": "1"}
        )
    return name


def encode(
    tokenizer: Any, text: str, add_special_tokens: bool = True, max_tokens: int | None = None
) -> tuple[int, ...]:
    """Token ids of `text`. Blocking (milliseconds to seconds): routes call it in the worker pool.

    With `max_tokens`, a longer prompt is refused (the engine's own 422) from the encoding's
    length, before its ids become a Python list: building a list of millions of ids holds the
    GIL for a second (docs/benchmarks/hostile.md). The fast tokenizer's backend is called the
    way transformers calls it (`encode_batch`, which releases the GIL while it encodes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate from a JSON \ud800 escape
        raise ApiError(422, f"the text is not valid Unicode ({exc.reason})", "validation") from exc
    backend = getattr(tokenizer, "_tokenizer", None)
    if max_tokens is None or backend is None or backend.truncation or backend.padding:
        return tuple(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    [encoding] = backend.encode_batch([text], add_special_tokens=add_special_tokens)
    if len(encoding) > max_tokens:
        raise InvalidRequestError(
            f"the prompt has {len(encoding)} tokens, more than max_input_tokens={max_tokens}"
        )
    return tuple(encoding.ids)


def room_left(engine: Engine, num_prompt_tokens: int) -> int:
    """Tokens that may still be generated after the prompt (>= 1 so the engine explains a 422)."""
    return max(1, engine.max_total_tokens - num_prompt_tokens)


class EngineStream:
    """One request's token stream: admission errors surface on `open()`, `close()` always runs.

    Closing before the final event (client gone, handler cancelled) closes the engine iterator
    and aborts the request, which frees its KV blocks. Metrics are recorded here because this is
    where arrival, first token and each token are seen.
    """

    def __init__(self, ctx: ServerContext, request: GenerationRequest, route: str) -> None:
        self._ctx = ctx
        self.request = request
        self._route = route
        self._iterator: AsyncIterator[TokenEvent] | None = None
        self._first: TokenEvent | None = None
        self._started = time.perf_counter()
        self._last_token_at: float | None = None
        self.final: TokenEvent | None = None
        self.num_generated = 0

    async def open(self) -> None:
        metrics = self._ctx.metrics
        try:
            self._iterator = aiter(self._ctx.engine.generate(self.request))
            self._first = await anext(self._iterator)
        except EngineError as exc:
            metrics.rejected.labels(exc.error_type).inc()
            raise
        except StopAsyncIteration as exc:
            raise ApiError(500, "the engine ended the request without a result", "generation") from exc
        except BaseException:  # cancelled while queued (client gone): the engine must forget it
            await self._abandon()
            raise
        metrics.in_flight.inc()
        metrics.prompt_tokens.inc(len(self.request.prompt_token_ids))
        metrics.prompt_length.observe(len(self.request.prompt_token_ids))

    async def events(self) -> AsyncIterator[TokenEvent]:
        assert self._iterator is not None and self._first is not None, "open() first"
        event: TokenEvent | None = self._first
        while event is not None:
            self._observe(event)
            yield event
            if event.finish_reason is not None:
                self.final = event
                return
            event = await anext(self._iterator, None)
        raise ApiError(500, "the engine stream ended without a finish reason", "generation")

    def _observe(self, event: TokenEvent) -> None:
        if event.token_id is None:
            return
        now = time.perf_counter()
        if self._last_token_at is None:
            self._ctx.metrics.time_to_first_token.observe(now - self._started)
        else:
            self._ctx.metrics.inter_token_latency.observe(now - self._last_token_at)
        self._last_token_at = now
        self.num_generated += 1

    async def _abandon(self) -> None:
        """Close the engine iterator and abort the request (both are no-ops once it finished)."""
        if self._iterator is not None:
            with contextlib.suppress(Exception):
                await self._iterator.aclose()  # type: ignore[attr-defined]
        with contextlib.suppress(Exception):
            await self._ctx.engine.abort(self.request.request_id)

    async def close(self) -> None:
        if self._iterator is None or self._first is None:
            return
        metrics = self._ctx.metrics
        if self.final is None:
            await self._abandon()
        finish = self.final.finish_reason if self.final else FinishReason.CANCELLED
        metrics.in_flight.dec()
        metrics.generation_tokens.inc(self.num_generated)
        metrics.generation_length.observe(self.num_generated)
        metrics.request_duration.labels(self._route).observe(time.perf_counter() - self._started)
        metrics.adapter_requests.labels(self.request.adapter or "", str(finish)).inc()
        metrics.count_tokens(self.request.adapter, len(self.request.prompt_token_ids), self.num_generated)
        self._iterator = None


@contextlib.asynccontextmanager
async def engine_stream(
    ctx: ServerContext, request: GenerationRequest, route: str
) -> AsyncIterator[EngineStream]:
    stream = EngineStream(ctx, request, route)
    await stream.open()
    try:
        yield stream
    finally:
        await stream.close()


def error_type_of(event: TokenEvent) -> str:
    """The `error_type` of a failed request's final event (docs/errors.md)."""
    return event.error_type or ("generation" if event.finish_reason is FinishReason.ERROR else "cancelled")


def raise_if_failed(event: TokenEvent) -> None:
    if event.finish_reason is FinishReason.ERROR:
        raise ApiError(500, event.error or "generation failed", error_type_of(event))
    if event.finish_reason is FinishReason.CANCELLED:
        headers = {"Retry-After": "1"} if event.error_type == "shutdown" else {}
        raise ApiError(503, event.error or "the request was cancelled", error_type_of(event), headers=headers)


class StopTextFilter:
    """Holds back text that may begin a stop string, so a matched stop string is never sent.

    OpenAI semantics: the stop sequence is not part of the output, also when streaming.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        keep = self._longest_stop_prefix_suffix()
        out = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(self._pending) - keep :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _longest_stop_prefix_suffix(self) -> int:
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(self._pending)), best, -1):
                if self._pending.endswith(stop[:n]):
                    best = n
                    break
        return best


async def write_sse(response: web.StreamResponse, payload: bytes) -> None:
    await response.write(b"data: " + payload + b"\n\n")


class TokenTexts:
    """`tokenizer.decode` of one-token lists, cached per response; `add` decodes many ids in one call.

    Prompt logprobs name up to (alternatives + 1) x prompt tokens ids: 21k for a 1k-token prompt
    with 20 alternatives, 0.1 s of the event loop one `decode` at a time, ~7 ms batched.
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def add(self, token_ids: Iterable[int]) -> None:
        new = [t for t in set(token_ids) if t not in self._texts]
        if new:
            self._texts.update(zip(new, self._tokenizer.batch_decode([[t] for t in new]), strict=True))

    def __call__(self, token_ids: list[int]) -> str:
        if len(token_ids) != 1:
            return self._tokenizer.decode(token_ids)
        text = self._texts.get(token_ids[0])
        if text is None:
            text = self._texts[token_ids[0]] = self._tokenizer.decode(token_ids)
        return text
