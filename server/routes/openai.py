"""OpenAI routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

`model` is an adapter's served name or alias, or the base model's served name (no adapter);
an unknown name is a 404, never the base model. One choice per request (`n=1`); the stop
sequence is cut from the output (also when streaming); streams end with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from loraplex.server.api_schemas import ChatCompletionRequest, ChatMessage, CompletionRequest
from loraplex.server.auth import Caller, caller_of
from loraplex.server.engine_api import UnknownAdapterError
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.routes.context import ServerContext, get_context
from loraplex.server.routes.errors import ApiError, read_json, render
from loraplex.server.routes.generation import (
    SSE_HEADERS,
    StopTextFilter,
    authorize_adapter,
    encode,
    engine_stream,
    error_type_of,
    raise_if_failed,
    resolve_adapter,
    room_left,
    write_sse,
)
from loraplex.server.sampling_params import SamplingParams

_FINISH = {FinishReason.LENGTH: "length", FinishReason.EOS: "stop", FinishReason.STOP: "stop"}
_UNSUPPORTED: tuple[tuple[str, Callable[[Any], bool]], ...] = (
    ("n", lambda b: b.n != 1),
    ("best_of", lambda b: (getattr(b, "best_of", None) or 1) > 1),
    ("suffix", lambda b: getattr(b, "suffix", None) is not None),
    ("logit_bias", lambda b: bool(b.logit_bias)),
    ("tools", lambda b: bool(getattr(b, "tools", None))),
    ("response_format", lambda b: (getattr(b, "response_format", None) or {}).get("type", "text") != "text"),
)


@dataclass(frozen=True)
class _Dialect:
    """What differs between completions and chat in one place: ids, object names, chunk shapes."""

    id_prefix: str
    object: str
    chunk_object: str
    chat: bool


_COMPLETION = _Dialect("cmpl-", "text_completion", "text_completion", chat=False)
_CHAT = _Dialect("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)


def _refuse_unsupported(body: CompletionRequest | ChatCompletionRequest) -> None:
    for name, is_set in _UNSUPPORTED:
        if is_set(body):
            raise ApiError(422, f"`{name}` is not supported by this server", "validation", param=name)


def _adapter_for(ctx: ServerContext, model: str) -> str | None:
    try:
        return resolve_adapter(ctx, model)
    except UnknownAdapterError as exc:
        raise ApiError(
            404, f"The model `{model}` does not exist: {exc}", "model_not_found", param="model"
        ) from exc


def _sampling(
    body: CompletionRequest | ChatCompletionRequest, max_new_tokens: int, top_n: int
) -> SamplingParams:
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    try:
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,  # OpenAI's default
            top_k=max(0, body.top_k or 0),  # vLLM's -1 = off
            top_p=body.top_p or 1.0,
            min_p=body.min_p or 0.0,
            repetition_penalty=body.repetition_penalty or 1.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            seed=body.seed,
            stop=stop,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            ignore_eos=body.ignore_eos,
            logprobs=top_n >= 0,
            top_n_tokens=max(0, top_n),
        )
    except ValueError as exc:
        raise ApiError(422, str(exc), "validation") from exc


def _completion_prompt(
    ctx: ServerContext, prompt: str | list[int] | list[str] | list[list[int]]
) -> tuple[int, ...]:
    if isinstance(prompt, str):
        return encode(ctx.engine.tokenizer, prompt)
    if prompt and all(isinstance(x, int) for x in prompt):
        return tuple(prompt)  # type: ignore[arg-type]
    if len(prompt) != 1:
        raise ApiError(422, "one prompt per request is supported", "validation", param="prompt")
    return _completion_prompt(ctx, prompt[0])


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.type != "text" for part in message.content):
        raise ApiError(422, "only text content parts are supported", "validation", param="messages")
    return "".join(part.text or "" for part in message.content)


def _chat_prompt(ctx: ServerContext, body: ChatCompletionRequest) -> tuple[int, ...]:
    tokenizer = ctx.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(422, "this model's tokenizer has no chat template", "validation", param="messages")
    messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=body.add_generation_prompt
        )
    except Exception as exc:  # a template's raise_exception (e.g. roles must alternate)
        raise ApiError(422, f"chat template: {exc}", "validation", param="messages") from exc
    return encode(tokenizer, text, add_special_tokens=False)  # the template writes its own BOS


def _request(ctx: ServerContext, body: CompletionRequest | ChatCompletionRequest) -> GenerationRequest:
    _refuse_unsupported(body)
    adapter = _adapter_for(ctx, body.model)
    if isinstance(body, ChatCompletionRequest):
        prompt = _chat_prompt(ctx, body)
        max_new = body.max_completion_tokens or body.max_tokens
        top_n = (body.top_logprobs or 0) if body.logprobs else -1
    else:
        prompt = _completion_prompt(ctx, body.prompt)
        max_new = body.max_tokens
        top_n = -1 if body.logprobs is None else body.logprobs
    params = _sampling(body, max_new or room_left(ctx.engine, len(prompt)), top_n)
    return GenerationRequest(uuid.uuid4().hex, prompt, params, adapter)


class _Writer:
    """Turns engine events into OpenAI choices (text, logprobs), for both dialects."""

    def __init__(self, ctx: ServerContext, body: Any, request: GenerationRequest, dialect: _Dialect) -> None:
        self._ctx, self._body, self._request, self._dialect = ctx, body, request, dialect
        self._stops = StopTextFilter(request.params.stop)
        self.id = dialect.id_prefix + request.request_id
        self.created = int(time.time())
        self._offset = 0
        self.num_generated = 0

    def text_of(self, event: TokenEvent) -> str:
        if event.token_id is not None:
            self.num_generated += 1
        text = self._stops.push(event.text)
        return text + self._stops.flush() if event.finish_reason is not None else text

    def logprobs(self, events: list[TokenEvent]) -> dict[str, Any] | None:
        if not self._request.params.logprobs:
            return None
        decode = self._ctx.engine.tokenizer.decode
        tokens = [e for e in events if e.token_id is not None]
        if self._dialect.chat:
            return {"content": [_chat_logprob(decode, e) for e in tokens]}
        texts = [decode([e.token_id]) for e in tokens]
        offsets = []
        for text in texts:
            offsets.append(self._offset)
            self._offset += len(text)
        return {
            "tokens": texts,
            "token_logprobs": [e.logprob for e in tokens],
            "top_logprobs": [{decode([a.token_id]): a.logprob for a in e.top_logprobs} for e in tokens],
            "text_offset": offsets,
        }

    def choice(self, text: str, logprobs: dict[str, Any] | None, finish: FinishReason | None) -> dict:
        finish_reason = _FINISH.get(finish) if finish is not None else None
        if not self._dialect.chat:
            return {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
        return {"index": 0, "logprobs": logprobs, "finish_reason": finish_reason}

    def usage(self) -> dict[str, int]:
        prompt = len(self._request.prompt_token_ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": self.num_generated,
            "total_tokens": prompt + self.num_generated,
        }

    def envelope(self, choices: list[dict], chunk: bool) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": self._dialect.chunk_object if chunk else self._dialect.object,
            "created": self.created,
            "model": self._body.model,
            "choices": choices,
        }


def _chat_logprob(decode: Callable[[list[int]], str], event: TokenEvent) -> dict[str, Any]:
    token = decode([event.token_id])
    return {
        "token": token,
        "logprob": event.logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": (t := decode([a.token_id])), "logprob": a.logprob, "bytes": list(t.encode())}
            for a in event.top_logprobs
        ],
    }


async def _complete(ctx: ServerContext, body: Any, dialect: _Dialect) -> dict[str, Any]:
    request = await ctx.blocking.run(_request, ctx, body)  # tokenising, chat template: off the loop
    writer = _Writer(ctx, body, request, dialect)
    events: list[TokenEvent] = []
    text: list[str] = []
    async with engine_stream(ctx, request, dialect.object) as stream:
        async for event in stream.events():
            raise_if_failed(event)
            events.append(event)
            text.append(writer.text_of(event))
    final = events[-1].finish_reason
    prefix = body.prompt if (not dialect.chat and body.echo and isinstance(body.prompt, str)) else ""
    choice = writer.choice(prefix + "".join(text), writer.logprobs(events), final)
    if dialect.chat:
        choice["message"] = {"role": "assistant", "content": "".join(text)}
    return {**writer.envelope([choice], chunk=False), "usage": writer.usage()}


async def _chunks(
    writer: _Writer, body: Any, events: AsyncIterator[TokenEvent], chat: bool
) -> AsyncIterator[dict]:
    """The stream's JSON chunks, in order, before `[DONE]`."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    extra = {"usage": None} if include_usage else {}
    if chat:
        first = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        yield {**writer.envelope([first], chunk=True), **extra}
    elif body.echo and isinstance(body.prompt, str):
        yield {**writer.envelope([writer.choice(body.prompt, None, None)], chunk=True), **extra}
    async for event in events:
        if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            yield {"error": {"message": event.error or "generation failed", "type": "server_error", "param": None,
                             "code": error_type_of(event)}}  # fmt: skip
            return
        text = writer.text_of(event)
        logprobs = writer.logprobs([event])
        if not text and event.finish_reason is None and not logprobs:
            continue
        choice = writer.choice(text, logprobs, event.finish_reason)
        if chat:
            choice["delta"] = {"content": text} if text else {}
        yield {**writer.envelope([choice], chunk=True), **extra}
    if include_usage:
        yield {**writer.envelope([], chunk=True), "usage": writer.usage()}


async def _stream(http: web.Request, ctx: ServerContext, body: Any, dialect: _Dialect) -> web.StreamResponse:
    request = await ctx.blocking.run(_request, ctx, body)  # tokenising, chat template: off the loop
    writer = _Writer(ctx, body, request, dialect)
    async with engine_stream(ctx, request, dialect.chunk_object) as stream:
        response = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": request.request_id})
        await response.prepare(http)
        try:
            async for chunk in _chunks(writer, body, stream.events(), dialect.chat):
                await write_sse(response, json.dumps(chunk).encode())
            await write_sse(response, b"[DONE]")
        except ConnectionResetError:
            return response  # the client left; closing the stream aborts the request
    await response.write_eof()
    return response


async def completions(http: web.Request) -> web.StreamResponse:
    ctx = get_context(http)
    body = CompletionRequest.model_validate(await read_json(http))
    authorize_adapter(http, ctx, _adapter_for(ctx, body.model))
    if body.stream:
        return await _stream(http, ctx, body, _COMPLETION)
    return web.json_response(await _complete(ctx, body, _COMPLETION))


async def chat_completions(http: web.Request) -> web.StreamResponse:
    ctx = get_context(http)
    body = ChatCompletionRequest.model_validate(await read_json(http))
    authorize_adapter(http, ctx, _adapter_for(ctx, body.model))
    if body.stream:
        return await _stream(http, ctx, body, _CHAT)
    return web.json_response(await _complete(ctx, body, _CHAT))


def _model_cards(ctx: ServerContext, caller: Caller) -> list[dict[str, Any]]:
    """The models this caller may use (base and adapters)."""
    base = ctx.engine.model_name
    cards = [
        {
            "id": base,
            "object": "model",
            "created": int(ctx.started_at),
            "owned_by": "loraplex",
            "root": ctx.settings.model_id or base,
            "parent": None,
            "max_model_len": ctx.engine.max_total_tokens,
        }
    ]
    for adapter in ctx.engine.list_adapters():
        if adapter.state == "failed" or not ctx.access.may_use(caller, adapter.name):
            continue
        cards.append(
            {
                "id": adapter.name,
                "object": "model",
                "created": int(adapter.loaded_at or ctx.started_at),
                "owned_by": "loraplex",
                "root": adapter.source,
                "parent": base,
                "max_model_len": ctx.engine.max_total_tokens,
            }
        )
    if not ctx.access.may_use(caller, None):
        cards.pop(0)
    return cards


async def list_models(http: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": _model_cards(get_context(http), caller_of(http))})


async def get_model(http: web.Request) -> web.Response:
    name = http.match_info["model"]
    for card in _model_cards(get_context(http), caller_of(http)):
        if card["id"] == name:
            return web.json_response(card)
    return render(ApiError(404, f"The model `{name}` does not exist", "model_not_found", param="model"), True)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
