"""Several choices of one HTTP request (`n`, `best_of`): one engine request each, run together.

The first choice computes the prompt; the others name it in `shares_prompt_with`, so the engine
admits them once the prompt's K/V are cached and they read its full blocks from the prefix
cache: `n=4` costs one prompt, not four. Each choice gets its own seed (`seed + i`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence

from loraplex.server.request import GenerationRequest, PromptTokenLogprob, TokenEvent
from loraplex.server.routes.context import ServerContext
from loraplex.server.routes.generation import EngineStream, engine_stream, raise_if_failed
from loraplex.server.sampling_params import SamplingParams


def choice_requests(
    prompt: tuple[int, ...],
    params: SamplingParams,
    adapter: str | None,
    count: int,
    share_scoring: bool = True,
) -> list[GenerationRequest]:
    """`count` requests for one prompt; all but the first reuse the first one's prompt blocks.

    `share_scoring`: only the first one computes the prompt's log-probabilities (the others read
    its blocks from the prefix cache, which a scoring request cannot).
    """
    first = uuid.uuid4().hex
    requests = []
    followers = dataclasses.replace(params, prompt_logprobs=None) if share_scoring else params
    for i in range(count):
        seed = None if params.seed is None else params.seed + i
        requests.append(
            GenerationRequest(
                request_id=first if i == 0 else f"{first}-{i}",
                prompt_token_ids=prompt,
                params=dataclasses.replace(followers, seed=seed) if i else params,
                adapter=adapter,
                shares_prompt_with=first if i else None,
            )
        )
    return requests


@contextlib.asynccontextmanager
async def open_streams(
    ctx: ServerContext, requests: Sequence[GenerationRequest], route: str
) -> AsyncIterator[list[EngineStream]]:
    """Admit every request (in order, so a choice's prompt leader is queued first); if one is
    refused, the others are aborted and the refusal raised."""
    async with contextlib.AsyncExitStack() as stack:
        opened = await asyncio.gather(
            *(stack.enter_async_context(engine_stream(ctx, r, route)) for r in requests),
            return_exceptions=True,
        )
        for result in opened:
            if isinstance(result, BaseException):
                raise result
        yield list(opened)  # type: ignore[arg-type]


async def collect(streams: Sequence[EngineStream]) -> list[list[TokenEvent]]:
    """Every stream's events to the end; a failed choice fails the request."""

    async def one(stream: EngineStream) -> list[TokenEvent]:
        events = []
        async for event in stream.events():
            raise_if_failed(event)
            events.append(event)
        return events

    return list(await asyncio.gather(*(one(s) for s in streams)))


async def merged(streams: Sequence[EngineStream]) -> AsyncIterator[tuple[int, TokenEvent]]:
    """`(stream index, event)` as they arrive, until every stream has finished."""
    queue: asyncio.Queue[tuple[int, TokenEvent] | BaseException] = asyncio.Queue()

    async def pump(i: int, stream: EngineStream) -> None:
        try:
            async for event in stream.events():
                await queue.put((i, event))
        except Exception as exc:
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            if item[1].finish_reason is not None:
                remaining -= 1
            yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def cumulative_logprob(events: Sequence[TokenEvent]) -> float:
    return sum(e.logprob or 0.0 for e in events if e.token_id is not None)


def ranked(candidates: Sequence[Sequence[TokenEvent]]) -> list[int]:
    """Candidate indices, highest cumulative logprob first (TGI's and vLLM's `best_of` order)."""
    return sorted(range(len(candidates)), key=lambda i: -cumulative_logprob(candidates[i]))


def best_choices(candidates: Sequence[Sequence[TokenEvent]], n: int) -> list[int]:
    """Indices of the `n` best candidates; all of them in their own order when `n` is all."""
    return list(range(n)) if n == len(candidates) else ranked(candidates)[:n]


def prompt_entries_of(events: Sequence[TokenEvent]) -> tuple[PromptTokenLogprob | None, ...] | None:
    """The prompt log-probabilities a request's events carry (on one of them), if it asked."""
    return next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)


def prompt_token_ids(prompt: Sequence[int], entries: Sequence[PromptTokenLogprob | None] | None) -> list[int]:
    """Every token id a prompt's logprobs name: its own tokens and their alternatives."""
    ids = list(prompt)
    for entry in entries or ():
        if entry is not None:
            ids += [a.token_id for a in entry.top]
    return ids
