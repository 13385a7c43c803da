"""TGI routes: `POST /`, `/generate`, `/generate_stream` and `GET /info`.

Shapes follow text-generation-inference so `huggingface_hub.InferenceClient.text_generation`
works unchanged: the compat route `POST /` wraps a non-streamed answer in a list, streams are
SSE `data: {index, token, top_tokens, generated_text, details}` events without `[DONE]`, with
`generated_text` (and `details` when asked) only on the last one. The stop sequence stays in the
output, as in TGI. `decoder_input_details` (with `details`) fills `details.prefill` with the
prompt's tokens and their logprobs, the first one null; streams refuse it (422), as TGI does.
"""

from __future__ import annotations

import json
import os
from typing import Any

from aiohttp import web

from loraplex.server.api_schemas import (
    MAX_BEST_OF,
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    TGIGenerateRequest,
    TGIParameters,
    TokenizeRequest,
    unsupported_fields_set,
)
from loraplex.server.request import (
    FinishReason,
    GenerationRequest,
    PromptTokenLogprob,
    TokenEvent,
    TokenLogprob,
)
from loraplex.server.routes.choices import choice_requests, collect, open_streams, prompt_entries_of, ranked
from loraplex.server.routes.context import ServerContext, get_context
from loraplex.server.routes.errors import ApiError, read_json
from loraplex.server.routes.generation import (
    SSE_HEADERS,
    TokenTexts,
    authorize_adapter,
    encode,
    engine_stream,
    error_type_of,
    resolve_adapter,
    room_left,
    write_sse,
)
from loraplex.server.routes.openai_output import MIN_LOGPROB
from loraplex.server.sampling_params import SamplingParams
from loraplex.version import __version__


def _refuse(p: TGIParameters, stream: bool) -> None:
    """Parameters TGI accepts that this server cannot honour: refused (422), never ignored."""
    for name in unsupported_fields_set(p):
        raise ApiError(422, f"`{name}` is not supported by this server", "validation", param=name)
    if p.decoder_input_details and stream:
        raise ApiError(
            422,
            "`decoder_input_details` == true is not supported when streaming tokens",
            "validation",
            param="decoder_input_details",
        )
    if (p.best_of or 1) > 1 and stream:
        raise ApiError(
            422, "`best_of` != 1 is not supported when streaming tokens", "validation", param="best_of"
        )
    if (p.best_of or 1) > 1 and not _samples(p):
        raise ApiError(422, "you must use sampling when `best_of` is > 1", "validation", param="best_of")
    if (p.best_of or 1) > 1 and p.seed is not None:
        raise ApiError(422, "`seed` must not be set when `best_of` is > 1", "validation", param="seed")


def _samples(p: TGIParameters) -> bool:
    # TGI samples when asked to, or when any warper is set (its NextTokenChooser rule).
    return (
        bool(p.do_sample) or p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
    )


def _sampling(ctx: ServerContext, p: TGIParameters, num_prompt_tokens: int) -> SamplingParams:
    sample = _samples(p)
    default_max = min(ctx.settings.default_max_new_tokens, room_left(ctx.engine, num_prompt_tokens))
    try:
        return SamplingParams(
            max_new_tokens=p.max_new_tokens or default_max,
            temperature=(p.temperature or 1.0) if sample else 0.0,
            top_k=p.top_k or 0,
            top_p=p.top_p or 1.0,
            repetition_penalty=p.repetition_penalty or 1.0,
            frequency_penalty=p.frequency_penalty or 0.0,
            seed=p.seed,
            stop=tuple(p.stop or ()),
            logprobs=True,  # TGI always reports each token's logprob
            top_n_tokens=p.top_n_tokens or 0,
            prompt_logprobs=0 if p.details and p.decoder_input_details else None,
        )
    except ValueError as exc:
        raise ApiError(422, str(exc), "validation") from exc


def build_requests(ctx: ServerContext, body: TGIGenerateRequest, stream: bool) -> list[GenerationRequest]:
    """The request's engine requests: one, or `best_of` sharing the prompt's KV blocks."""
    p = body.parameters
    _refuse(p, stream)
    adapter = resolve_adapter(ctx, p.adapter_id)
    limit = ctx.engine.max_input_tokens if p.truncate is None else None  # truncated after
    prompt_ids = encode(ctx.engine.tokenizer, body.inputs, max_tokens=limit)
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]
    return choice_requests(prompt_ids, _sampling(ctx, p, len(prompt_ids)), adapter, p.best_of or 1)


class _Output:
    """Generated text the TGI way: a matched stop sequence stays in the output (the engine cuts it)."""

    def __init__(self, ctx: ServerContext) -> None:
        self._decode = ctx.engine.tokenizer.decode
        self._ids: list[int] = []
        self._pieces: list[str] = []

    def add(self, event: TokenEvent) -> str:
        """The event's text; on a stop, completed with the stop sequence as decoding gives it."""
        if event.token_id is not None:
            self._ids.append(event.token_id)
        text = event.text
        if event.finish_reason is FinishReason.STOP:
            so_far = self.text + text
            full = self._decode(self._ids, skip_special_tokens=True)
            text += full[len(so_far) :] if full.startswith(so_far) else ""
        self._pieces.append(text)
        return text

    @property
    def text(self) -> str:
        return "".join(self._pieces)


def _token(ctx: ServerContext, event: TokenEvent, text: str) -> dict[str, Any]:
    if event.token_id is None:  # a final event without a new token
        eos = getattr(ctx.engine.tokenizer, "eos_token_id", None) or 0
        return {"id": eos, "text": text, "logprob": 0.0, "special": True}
    return {
        "id": event.token_id,
        "text": text,
        "logprob": event.logprob,
        "special": event.token_id in ctx.special_token_ids,
    }


def _top_tokens(ctx: ServerContext, alternatives: tuple[TokenLogprob, ...]) -> list[dict[str, Any]]:
    decode = ctx.engine.tokenizer.decode
    return [
        {
            "id": alt.token_id,
            "text": decode([alt.token_id]),
            "logprob": alt.logprob,
            "special": alt.token_id in ctx.special_token_ids,
        }
        for alt in alternatives
    ]


def _prefill(
    ctx: ServerContext, request: GenerationRequest, entries: tuple[PromptTokenLogprob | None, ...] | None
) -> list[dict[str, Any]]:
    """TGI's `details.prefill`: `{id, text, logprob}` per prompt token, the first logprob null."""
    if entries is None:
        raise ApiError(500, "the engine returned no prompt logprobs", "generation")
    texts = TokenTexts(ctx.engine.tokenizer)
    texts.add(request.prompt_token_ids)
    return [
        {
            "id": token_id,
            "text": texts([token_id]),
            "logprob": None if entry is None else max(entry.logprob, MIN_LOGPROB),
        }
        for token_id, entry in zip(request.prompt_token_ids, entries, strict=True)
    ]


def _seed(p: TGIParameters, request: GenerationRequest) -> int | None:
    return None if request.params.is_greedy else request.params.seed


class _Sequence:
    """One generated sequence in TGI's terms: its text, tokens and top tokens."""

    def __init__(self, ctx: ServerContext, events: list[TokenEvent]) -> None:
        output = _Output(ctx)
        self.tokens: list[dict[str, Any]] = []
        self.top_tokens: list[list[dict[str, Any]]] = []
        for event in events:
            text = output.add(event)
            if event.token_id is not None:
                self.tokens.append(_token(ctx, event, text))
                self.top_tokens.append(_top_tokens(ctx, event.top_logprobs))
        self.text = output.text
        self.finish_reason = str(events[-1].finish_reason)

    def details(self, p: TGIParameters, request: GenerationRequest, prefill: list[dict]) -> dict[str, Any]:
        return {
            "finish_reason": self.finish_reason,
            "generated_tokens": len(self.tokens),
            "seed": _seed(p, request),
            "prefill": prefill,
            "tokens": self.tokens,
            "top_tokens": self.top_tokens if p.top_n_tokens else None,
        }


async def generate_json(
    ctx: ServerContext, body: TGIGenerateRequest
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run one request to the end; the TGI `GenerateResponse` and its headers."""
    requests = await ctx.blocking.run(build_requests, ctx, body, False)  # tokenising: off the event loop
    p = body.parameters
    async with open_streams(ctx, requests, "generate") as streams:
        outputs = await collect(streams)
    order = ranked(outputs)  # best first
    best = _Sequence(ctx, outputs[order[0]])

    def full(text: str) -> str:
        return (body.inputs + text) if p.return_full_text else text

    result: dict[str, Any] = {"generated_text": full(best.text)}
    if p.details:
        # Every sequence has the prompt's prefill; the first request computed it for all of them.
        prefill = _prefill(ctx, requests[0], prompt_entries_of(outputs[0])) if p.decoder_input_details else []
        others = [(_Sequence(ctx, outputs[i]), requests[i]) for i in order[1:]]
        result["details"] = {
            **best.details(p, requests[order[0]], prefill),
            "best_of_sequences": [
                {"generated_text": full(seq.text), **seq.details(p, r, prefill)} for seq, r in others
            ]
            or None,
        }
    headers = {
        "x-request-id": requests[0].request_id,
        "x-prompt-tokens": str(len(requests[0].prompt_token_ids)),
        "x-generated-tokens": str(len(best.tokens)),
    }
    return result, headers


async def stream_sse(http: web.Request, ctx: ServerContext, body: TGIGenerateRequest) -> web.StreamResponse:
    """TGI's `generate_stream`: admission errors are plain JSON errors, later ones SSE error events."""
    [request] = await ctx.blocking.run(build_requests, ctx, body, True)  # tokenising: off the event loop
    p = body.parameters
    async with engine_stream(ctx, request, "generate_stream") as stream:
        response = web.StreamResponse(headers={**SSE_HEADERS, "x-request-id": request.request_id})
        await response.prepare(http)
        output = _Output(ctx)
        index = 0
        try:
            async for event in stream.events():
                if event.finish_reason in (FinishReason.ERROR, FinishReason.CANCELLED):
                    error = {
                        "error": event.error or str(event.finish_reason),
                        "error_type": error_type_of(event),
                    }
                    await write_sse(response, json.dumps(error).encode())
                    break
                index += 1
                payload: dict[str, Any] = {
                    "index": index,
                    "token": _token(ctx, event, output.add(event)),
                    "top_tokens": _top_tokens(ctx, event.top_logprobs) if p.top_n_tokens else None,
                    "generated_text": None,
                    "details": None,
                }
                if event.finish_reason is not None:
                    generated = output.text
                    payload["generated_text"] = (body.inputs + generated) if p.return_full_text else generated
                    if p.details:
                        payload["details"] = {
                            "finish_reason": str(event.finish_reason),
                            "generated_tokens": stream.num_generated,
                            "seed": _seed(p, request),
                            "input_length": len(request.prompt_token_ids),
                        }
                await write_sse(response, json.dumps(payload).encode())
        except ConnectionResetError:
            return response  # the client left; closing the stream aborts the request
    await response.write_eof()
    return response


async def generate(http: web.Request) -> web.Response:
    ctx = get_context(http)
    body = TGIGenerateRequest.model_validate(await read_json(http))
    authorize_adapter(http, ctx, resolve_adapter(ctx, body.parameters.adapter_id))
    result, headers = await generate_json(ctx, body)
    return web.json_response(result, headers=headers)


async def generate_stream(http: web.Request) -> web.StreamResponse:
    ctx = get_context(http)
    body = TGIGenerateRequest.model_validate(await read_json(http))
    authorize_adapter(http, ctx, resolve_adapter(ctx, body.parameters.adapter_id))
    return await stream_sse(http, ctx, body)


async def compat_generate(http: web.Request) -> web.StreamResponse:
    """`POST /`: what InferenceClient posts to; `stream` picks SSE, else a one-element list."""
    ctx = get_context(http)
    body = TGIGenerateRequest.model_validate(await read_json(http))
    authorize_adapter(http, ctx, resolve_adapter(ctx, body.parameters.adapter_id))
    if body.stream:  # an explicit null means no
        return await stream_sse(http, ctx, body)
    result, headers = await generate_json(ctx, body)
    return web.json_response([result], headers=headers)


async def info(http: web.Request) -> web.Response:
    ctx = get_context(http)
    engine = ctx.engine
    engine_config = _engine_limits(engine)
    body: dict[str, Any] = {
        "model_id": ctx.settings.model_id or engine.model_name,
        "served_model_name": engine.model_name,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_best_of": MAX_BEST_OF,
        "max_concurrent_requests": engine_config.get("max_concurrent_requests"),
        "max_batch_total_tokens": engine_config.get("max_batch_tokens"),
        "validation_workers": 1,  # requests are validated on the event loop, not by a worker pool
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_top_n_tokens": MAX_TOP_N_TOKENS,
        "max_input_tokens": engine.max_input_tokens,
        "max_input_length": engine.max_input_tokens,  # TGI 1.x's name
        "max_total_tokens": engine.max_total_tokens,
        "max_client_batch_size": 1,
        "router": "loraplex",
        "version": __version__,
        "sha": os.environ.get("GIT_SHA"),  # the image's commit, as TGI's images set it
        "docker_label": None,
        "adapters": [a.name for a in engine.list_adapters() if a.state != "failed"],
        **ctx.settings.info,
    }
    return web.json_response(body)


def _engine_limits(engine: Any) -> dict[str, Any]:
    config = getattr(engine, "_config", None)  # AsyncEngine's EngineConfig; absent on other engines
    return {k: getattr(config, k, None) for k in ("max_concurrent_requests", "max_batch_tokens")}


async def tokenize(http: web.Request) -> web.Response:
    """TGI's `POST /tokenize`: `[{id, text, start, stop}]`, offsets into `inputs`."""
    ctx = get_context(http)
    body = TokenizeRequest.model_validate(await read_json(http))
    tokenizer = ctx.engine.tokenizer
    encoded = tokenizer(body.inputs, return_offsets_mapping=True)
    return web.json_response(
        [
            {"id": token_id, "text": body.inputs[start:stop], "start": start, "stop": stop}
            for token_id, (start, stop) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True)
        ]
    )


def add_routes(app: web.Application) -> None:
    app.router.add_post("/", compat_generate)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_get("/info", info)
    app.router.add_post("/tokenize", tokenize)
