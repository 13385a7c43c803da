"""TGI routes: `POST /`, `/generate`, `/generate_stream` and `GET /info`.

Shapes follow text-generation-inference so `huggingface_hub.InferenceClient.text_generation`
works unchanged: the compat route `POST /` wraps a non-streamed answer in a list, streams are
SSE `data: {index, token, top_tokens, generated_text, details}` events without `[DONE]`, with
`generated_text` (and `details` when asked) only on the last one. The stop sequence stays in the
output, as in TGI.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from aiohttp import web

from loraplex.server.api_schemas import (
    MAX_STOP_SEQUENCES,
    MAX_TOP_N_TOKENS,
    TGIGenerateRequest,
    TGIParameters,
)
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent, TokenLogprob
from loraplex.server.routes.context import ServerContext, get_context
from loraplex.server.routes.errors import ApiError, read_json
from loraplex.server.routes.generation import (
    SSE_HEADERS,
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
from loraplex.version import __version__

# Parameters TGI accepts that this server cannot honour: refused (422), never silently ignored.
_UNSUPPORTED: tuple[tuple[str, Callable[[TGIParameters], bool]], ...] = (
    ("best_of > 1", lambda p: (p.best_of or 1) > 1),
    ("grammar", lambda p: p.grammar is not None),
    ("decoder_input_details", lambda p: p.decoder_input_details),
    ("watermark", lambda p: p.watermark),
    ("typical_p", lambda p: p.typical_p not in (None, 1.0)),
)


def _sampling(ctx: ServerContext, p: TGIParameters, num_prompt_tokens: int) -> SamplingParams:
    # TGI samples when asked to, or when any warper is set (its NextTokenChooser rule).
    sample = p.do_sample or p.temperature not in (None, 1.0) or bool(p.top_k) or p.top_p not in (None, 1.0)
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
            stop=tuple(p.stop),
            logprobs=True,  # TGI always reports each token's logprob
            top_n_tokens=p.top_n_tokens or 0,
        )
    except ValueError as exc:
        raise ApiError(422, str(exc), "validation") from exc


def build_request(ctx: ServerContext, body: TGIGenerateRequest) -> GenerationRequest:
    p = body.parameters
    for name, is_set in _UNSUPPORTED:
        if is_set(p):
            raise ApiError(422, f"`{name}` is not supported by this server", "validation", param=name)
    adapter = resolve_adapter(ctx, p.adapter_id)
    prompt_ids = encode(ctx.engine.tokenizer, body.inputs)
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]
    return GenerationRequest(
        request_id=uuid.uuid4().hex,
        prompt_token_ids=prompt_ids,
        params=_sampling(ctx, p, len(prompt_ids)),
        adapter=adapter,
    )


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


def _seed(p: TGIParameters, request: GenerationRequest) -> int | None:
    return None if request.params.is_greedy else p.seed


async def generate_json(
    ctx: ServerContext, body: TGIGenerateRequest
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run one request to the end; the TGI `GenerateResponse` and its headers."""
    request = await ctx.blocking.run(build_request, ctx, body)  # tokenising: off the event loop
    p = body.parameters
    tokens: list[dict[str, Any]] = []
    top_tokens: list[list[dict[str, Any]]] = []
    output = _Output(ctx)
    async with engine_stream(ctx, request, "generate") as stream:
        async for event in stream.events():
            raise_if_failed(event)
            text = output.add(event)
            if event.token_id is not None:
                tokens.append(_token(ctx, event, text))
                top_tokens.append(_top_tokens(ctx, event.top_logprobs))
        final = stream.final
    assert final is not None and final.finish_reason is not None
    generated = output.text
    result: dict[str, Any] = {
        "generated_text": (body.inputs + generated) if p.return_full_text else generated
    }
    if p.details:
        result["details"] = {
            "finish_reason": str(final.finish_reason),
            "generated_tokens": len(tokens),
            "seed": _seed(p, request),
            "prefill": [],
            "tokens": tokens,
            "top_tokens": top_tokens if p.top_n_tokens else None,
            "best_of_sequences": None,
        }
    headers = {
        "x-request-id": request.request_id,
        "x-prompt-tokens": str(len(request.prompt_token_ids)),
        "x-generated-tokens": str(len(tokens)),
    }
    return result, headers


async def stream_sse(http: web.Request, ctx: ServerContext, body: TGIGenerateRequest) -> web.StreamResponse:
    """TGI's `generate_stream`: admission errors are plain JSON errors, later ones SSE error events."""
    request = await ctx.blocking.run(build_request, ctx, body)  # tokenising: off the event loop
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
    if body.stream:
        return await stream_sse(http, ctx, body)
    result, headers = await generate_json(ctx, body)
    return web.json_response([result], headers=headers)


async def info(http: web.Request) -> web.Response:
    ctx = get_context(http)
    engine = ctx.engine
    body: dict[str, Any] = {
        "model_id": ctx.settings.model_id or engine.model_name,
        "served_model_name": engine.model_name,
        "model_sha": None,
        "model_pipeline_tag": "text-generation",
        "max_best_of": 1,
        "max_stop_sequences": MAX_STOP_SEQUENCES,
        "max_top_n_tokens": MAX_TOP_N_TOKENS,
        "max_input_tokens": engine.max_input_tokens,
        "max_total_tokens": engine.max_total_tokens,
        "max_client_batch_size": 1,
        "router": "loraplex",
        "version": __version__,
        "sha": None,
        "docker_label": None,
        "adapters": [a.name for a in engine.list_adapters() if a.state != "failed"],
        **ctx.settings.info,
    }
    return web.json_response(body)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/", compat_generate)
    app.router.add_post("/generate", generate)
    app.router.add_post("/generate_stream", generate_stream)
    app.router.add_get("/info", info)
