"""OpenAI routes: `POST /v1/completions`, `POST /v1/chat/completions`, `GET /v1/models`.

`model` is an adapter's served name or alias, or the base model's served name (no adapter);
absent, `tgi` (what TGI's `text-generation` client sends) and `dummy` (what
`huggingface_hub.InferenceClient` sends without a model) also mean the base model; any other
unknown name is a 404, never the base model. `n` and `best_of` run as parallel sequences that
share the prompt's KV blocks (`choices.py`); completions take a list of prompts (or token-id
lists), choice `i` of prompt `p` having index `p * n + i`, as in vLLM. The stop sequence is cut
from the output (also when streaming); streams end with `data: [DONE]`, except for TGI's own
client (`model: "tgi"`), whose parser cannot read it.

Prompt log-probabilities as vLLM serves them: `echo` with `logprobs` lists the prompt's tokens
first (the first one null), `echo` with `max_tokens: 0` returns the prompt alone (its scoring:
one token is still computed and counted in `usage`, as in vLLM, then dropped), and the
`prompt_logprobs` extension adds `choices[i].prompt_logprobs` (completions) or a top-level
`prompt_logprobs` (chat); it cannot stream. Only a prompt's first choice computes them.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from loraplex.server.api_schemas import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    unsupported_fields_set,
)
from loraplex.server.auth import Caller, caller_of
from loraplex.server.engine_api import UnknownAdapterError
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.routes.choices import (
    best_choices,
    choice_requests,
    collect,
    merged,
    open_streams,
    prompt_entries_of,
    prompt_token_ids,
)
from loraplex.server.routes.context import ServerContext, get_context
from loraplex.server.routes.errors import ApiError, read_json, render
from loraplex.server.routes.generation import (
    SSE_HEADERS,
    TokenTexts,
    authorize_adapter,
    encode,
    error_type_of,
    resolve_adapter,
    room_left,
    write_sse,
)
from loraplex.server.routes.openai_output import (
    CHAT,
    COMPLETION,
    ChoiceWriter,
    Dialect,
    EchoedPrompt,
    Envelope,
    PromptEntries,
    chat_delta,
    usage,
    vllm_prompt_logprobs,
)
from loraplex.server.sampling_params import SamplingParams

BASE_MODEL_PLACEHOLDERS = frozenset({"tgi", "dummy"})  # names clients send for "the served model"
Body = CompletionRequest | ChatCompletionRequest


@dataclass(frozen=True)
class _Plan:
    """One OpenAI request in engine terms: `best_of` engine requests per prompt, `n` returned."""

    body: Body
    dialect: Dialect
    model: str  # echoed in responses
    prompts: list[tuple[int, ...]]
    requests: list[GenerationRequest]  # prompt p's candidates: requests[p * best_of : (p + 1) * best_of]
    n: int
    best_of: int
    show_logprobs: bool
    echo_top: int | None = None  # `echo` with `logprobs`: the prompt's tokens lead the logprobs
    prompt_top: int | None = None  # `prompt_logprobs`
    prompt_only: bool = False  # `echo` with `max_tokens: 0`: the generated token is dropped

    def prompt_of(self, request_index: int) -> tuple[int, ...]:
        return self.prompts[request_index // self.best_of]

    @property
    def scoring_top(self) -> int | None:
        """Alternatives per prompt position the engine computes; None: no prompt scoring."""
        asked = [k for k in (self.echo_top, self.prompt_top) if k is not None]
        return max(asked) if asked else None


def _invalid(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, code, param=param)


def _refuse_unsupported(body: Body) -> None:
    for name in unsupported_fields_set(body):
        raise _invalid(f"`{name}` is not supported by this server", name, "unsupported")
    if body.prompt_logprobs is not None and body.stream:
        raise _invalid("`prompt_logprobs` are not available when `stream=True`", "prompt_logprobs")
    if isinstance(body, CompletionRequest) and body.max_tokens == 0 and not body.echo:
        raise _invalid(
            "`max_tokens` must be at least 1 (0 only with `echo`: the prompt's scoring)", "max_tokens"
        )


def _adapter_for(ctx: ServerContext, model: str | None) -> str | None:
    if model is None or model in BASE_MODEL_PLACEHOLDERS:
        return None
    try:
        return resolve_adapter(ctx, model)
    except UnknownAdapterError as exc:
        raise ApiError(
            404, f"The model `{model}` does not exist: {exc}", "model_not_found", param="model"
        ) from exc


def _sampling(
    body: Body, max_new_tokens: int, top_n: int, need_logprobs: bool, scoring_top: int | None
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
            ignore_eos=bool(body.ignore_eos),
            logprobs=top_n >= 0 or need_logprobs,
            top_n_tokens=max(0, top_n),
            prompt_logprobs=scoring_top,
        )
    except ValueError as exc:
        raise _invalid(str(exc), None) from exc


def _completion_prompts(ctx: ServerContext, prompt: Any) -> list[tuple[int, ...]]:
    if isinstance(prompt, str):
        return [encode(ctx.engine.tokenizer, prompt, max_tokens=ctx.engine.max_input_tokens)]
    if all(isinstance(x, int) for x in prompt):
        return [tuple(prompt)]
    return [p for item in prompt for p in _completion_prompts(ctx, item)]


def _message_text(message: ChatMessage) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    if any(part.type != "text" for part in message.content):
        raise _invalid("only text content parts are supported", "messages")
    return "".join(part.text or "" for part in message.content)


def _chat_prompt(ctx: ServerContext, body: ChatCompletionRequest) -> tuple[int, ...]:
    tokenizer = ctx.engine.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise _invalid("this model's tokenizer has no chat template", "messages")
    messages = [{"role": m.role, "content": _message_text(m)} for m in body.messages]
    add_generation_prompt = body.add_generation_prompt is not False
    try:
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # a template's raise_exception (e.g. roles must alternate)
        raise _invalid(f"chat template: {exc}", "messages") from exc
    limit = ctx.engine.max_input_tokens
    return encode(tokenizer, text, add_special_tokens=False, max_tokens=limit)  # the template writes its BOS


def _check_context(ctx: ServerContext, prompt: tuple[int, ...], max_new: int | None, param: str) -> None:
    """OpenAI's context-length error (code and wording), which client wrappers key off."""
    limit, max_input = ctx.engine.max_total_tokens, ctx.engine.max_input_tokens
    requested = len(prompt) + (max_new or 0)
    if len(prompt) > max_input or requested > limit:
        raise ApiError(
            400,
            f"This model's maximum context length is {limit} tokens (at most {max_input} in the prompt). "
            f"However, you requested {requested} tokens ({len(prompt)} in the {param}, {max_new or 0} in the "
            f"completion). Please reduce the length of the {param} or completion.",
            "context_length_exceeded",
            param=param,
        )


def _plan(ctx: ServerContext, body: Body, dialect: Dialect) -> _Plan:
    _refuse_unsupported(body)
    adapter = _adapter_for(ctx, body.model)
    n = body.n or 1
    best_of = getattr(body, "best_of", None) or n
    if best_of < n:
        raise _invalid(f"`best_of` ({best_of}) must be >= `n` ({n})", "best_of")
    if best_of > n and body.stream:
        raise _invalid("`best_of` > `n` is not supported when streaming", "best_of")
    if isinstance(body, ChatCompletionRequest):
        prompts, param = [_chat_prompt(ctx, body)], "messages"
        max_new = body.max_completion_tokens or body.max_tokens
        top_n = (body.top_logprobs or 0) if body.logprobs else -1
        echo_top, prompt_only = None, False
    else:
        prompts, param = _completion_prompts(ctx, body.prompt), "prompt"
        max_new, top_n = body.max_tokens, (-1 if body.logprobs is None else body.logprobs)
        echo_top = body.logprobs if body.echo else None
        prompt_only = bool(body.echo) and max_new == 0
    model = body.model if body.model and body.model not in BASE_MODEL_PLACEHOLDERS else ctx.engine.model_name
    plan = _Plan(body, dialect, model, prompts, [], n, best_of, top_n >= 0, echo_top, body.prompt_logprobs,
                 prompt_only)  # fmt: skip
    for prompt in prompts:
        _check_context(ctx, prompt, max_new, param)
        max_new_tokens = 1 if prompt_only else (max_new or room_left(ctx.engine, len(prompt)))
        params = _sampling(body, max_new_tokens, top_n, best_of > n, plan.scoring_top)
        # A stream's choices each score the prompt: they echo it as soon as their own first token comes.
        plan.requests.extend(choice_requests(prompt, params, adapter, best_of, share_scoring=not body.stream))
    return plan


def _writer(plan: _Plan, index: int, request: GenerationRequest, texts: TokenTexts) -> ChoiceWriter:
    return ChoiceWriter(index, plan.dialect, texts, request.params.stop, plan.show_logprobs,
                        len(request.prompt_token_ids))  # fmt: skip


def _echo(ctx: ServerContext, plan: _Plan, prompt_index: int) -> str:
    body = plan.body
    if plan.dialect.chat or not getattr(body, "echo", False):
        return ""
    prompt = body.prompt  # type: ignore[union-attr]
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[prompt_index]
    return ctx.engine.tokenizer.decode(list(plan.prompts[prompt_index]))


def _echoed(plan: _Plan, prompt_index: int, entries: PromptEntries | None) -> EchoedPrompt | None:
    if plan.echo_top is None:
        return None
    if entries is None:
        raise ApiError(500, "the engine returned no prompt logprobs", "generation")
    return EchoedPrompt(plan.prompts[prompt_index], entries, plan.echo_top)


def _prompt_logprobs(plan: _Plan, entries: PromptEntries | None, texts: TokenTexts) -> list:
    if entries is None:
        raise ApiError(500, "the engine returned no prompt logprobs", "generation")
    return vllm_prompt_logprobs(entries, texts, plan.prompt_top or 0)


def _choice(
    ctx: ServerContext, plan: _Plan, writer: ChoiceWriter, prompt_index: int, events: list[TokenEvent],
    entries: PromptEntries | None, texts: TokenTexts,
) -> dict[str, Any]:  # fmt: skip
    shown = [] if plan.prompt_only else events
    text = "".join(writer.text_of(e) for e in shown)
    logprobs = writer.logprobs(shown, _echoed(plan, prompt_index, entries))
    choice = writer.choice(_echo(ctx, plan, prompt_index) + text, logprobs, events[-1].finish_reason)
    if plan.dialect.chat:
        choice["message"] = {"role": "assistant", "content": text}
    elif plan.prompt_top is not None:
        choice["prompt_logprobs"] = _prompt_logprobs(plan, entries, texts)
    return choice


async def _complete(ctx: ServerContext, plan: _Plan) -> dict[str, Any]:
    async with open_streams(ctx, plan.requests, plan.dialect.object) as streams:
        outputs = await collect(streams)
    choices, completion_tokens, texts = [], 0, TokenTexts(ctx.engine.tokenizer)
    prompt_entries = [
        prompt_entries_of(outputs[p * plan.best_of]) for p in range(len(plan.prompts))
    ]  # 1st scored
    for prompt, entries in zip(plan.prompts, prompt_entries, strict=True):
        texts.add(prompt_token_ids(prompt, entries) if entries else ())
    for p in range(len(plan.prompts)):
        candidates = outputs[p * plan.best_of : (p + 1) * plan.best_of]
        completion_tokens += sum(1 for events in candidates for e in events if e.token_id is not None)
        for j, k in enumerate(best_choices(candidates, plan.n)):
            writer = _writer(plan, p * plan.n + j, plan.requests[p * plan.best_of + k], texts)
            choices.append(_choice(ctx, plan, writer, p, candidates[k], prompt_entries[p], texts))
    envelope = Envelope(plan.requests[0].request_id, plan.model, plan.dialect)
    response = {
        **envelope(choices, chunk=False),
        "usage": usage(sum(map(len, plan.prompts)), completion_tokens),
    }
    if plan.dialect.chat and plan.prompt_top is not None:
        response["prompt_logprobs"] = _prompt_logprobs(
            plan, prompt_entries[0], texts
        )  # vLLM: on the response
    return response


def _stream_error(event: TokenEvent) -> dict[str, Any]:
    return {"error": {"message": event.error or "generation failed", "type": "server_error", "param": None,
                      "code": error_type_of(event)}}  # fmt: skip


def _stream_piece(
    ctx: ServerContext, plan: _Plan, writer: ChoiceWriter, event: TokenEvent, texts: TokenTexts, echo: bool
) -> tuple[str, dict[str, Any] | None]:
    """One event's text and logprobs; `echo`: the choice's first event, led by the prompt (as in vLLM)."""
    text, shown = writer.text_of(event), [event]
    if plan.prompt_only:
        text, shown = "", []
    if not echo:
        return text, writer.logprobs(shown)
    prompt_index = writer.index // plan.n
    echoed = _echoed(plan, prompt_index, event.prompt_logprobs)
    if echoed is not None:
        texts.add(prompt_token_ids(echoed.token_ids, echoed.entries))
    return _echo(ctx, plan, prompt_index) + text, writer.logprobs(shown, echoed)


async def _chunks(ctx: ServerContext, plan: _Plan, streams: list) -> AsyncIterator[dict]:
    """The stream's JSON chunks, in order, before `[DONE]`."""
    options = plan.body.stream_options
    include_usage = bool(options and options.include_usage)
    continuous = bool(options and options.continuous_usage_stats)
    envelope = Envelope(plan.requests[0].request_id, plan.model, plan.dialect)
    texts = TokenTexts(ctx.engine.tokenizer)
    writers = [_writer(plan, i, r, texts) for i, r in enumerate(plan.requests)]

    def chunk(writer: ChoiceWriter, choice: dict) -> dict:
        extra: dict[str, Any] = (
            {"usage": writer.usage() if continuous else None} if include_usage or continuous else {}
        )
        return {**envelope([choice], chunk=True), **extra}

    for writer in writers:
        if plan.dialect.chat:
            first = {**writer.choice("", None, None), "delta": chat_delta("", first=True)}
            yield chunk(writer, first)
    to_echo = set() if plan.dialect.chat or not plan.body.echo else set(range(len(writers)))  # type: ignore[union-attr]
    async for i, event in merged(streams):
        writer = writers[i]
        if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
            yield _stream_error(event)
            return
        text, logprobs = _stream_piece(ctx, plan, writer, event, texts, echo=i in to_echo)
        to_echo.discard(i)
        if not text and event.finish_reason is None and not logprobs:
            continue
        choice = writer.choice(text, logprobs, event.finish_reason)
        if plan.dialect.chat:
            choice["delta"] = chat_delta(text or None, first=False)
        yield chunk(writer, choice)
    if include_usage:
        total = usage(sum(map(len, plan.prompts)), sum(w.num_generated for w in writers))
        yield {**envelope([], chunk=True), "usage": total}


async def _stream(http: web.Request, ctx: ServerContext, plan: _Plan) -> web.StreamResponse:
    async with open_streams(ctx, plan.requests, plan.dialect.chunk_object) as streams:
        headers = {**SSE_HEADERS, "x-request-id": plan.requests[0].request_id}
        response = web.StreamResponse(headers=headers)
        await response.prepare(http)
        try:
            async for chunk in _chunks(ctx, plan, streams):
                await write_sse(response, json.dumps(chunk).encode())
            if plan.body.model != "tgi":  # text-generation's chat parser fails on a non-JSON event
                await write_sse(response, b"[DONE]")
        except ConnectionResetError:
            return response  # the client left; closing the streams aborts the requests
    await response.write_eof()
    return response


async def _serve(http: web.Request, body: Body, dialect: Dialect) -> web.StreamResponse:
    ctx = get_context(http)
    authorize_adapter(http, ctx, _adapter_for(ctx, body.model))
    plan = await ctx.blocking.run(_plan, ctx, body, dialect)  # tokenising, chat template: off the loop
    if body.stream:
        return await _stream(http, ctx, plan)
    return web.json_response(await _complete(ctx, plan))


async def completions(http: web.Request) -> web.StreamResponse:
    return await _serve(http, CompletionRequest.model_validate(await read_json(http)), COMPLETION)


async def chat_completions(http: web.Request) -> web.StreamResponse:
    return await _serve(http, ChatCompletionRequest.model_validate(await read_json(http)), CHAT)


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
    return render(
        ApiError(404, f"The model `{name}` does not exist", "model_not_found", param="model"), http.path
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/v1/models/{model:.+}", get_model)
