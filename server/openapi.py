"""The OpenAPI document served at `/openapi.json`, built from the route table and the pydantic bodies.

Request bodies are the very models the routes validate with (`api_schemas`), answers are the
models of `api_responses`; path parameters, content types (`text/plain` metrics, SSE with the
schema of each event's `data:` in `x-sse-data`) and each route family's error shape are
declared. Tests check that every route the app registers is described here and validate real
responses against this document.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loraplex.server import api_responses as r
from loraplex.server import api_schemas as s
from loraplex.version import __version__


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    response: type[BaseModel] | None = None  # the JSON answer; None: an object not modelled here
    event: type[BaseModel] | None = None  # the `data:` of each Server-Sent Event, when it may stream
    list_response: bool = False  # the JSON answer is a list of `response`
    content_type: str = "application/json"
    query: tuple[tuple[str, str], ...] = ()  # optional string query parameters: (name, description)


ROUTES: tuple[Route, ...] = (
    Route("post", "/", "TGI compat generate (InferenceClient.text_generation): a one-element list; `stream` for SSE",
          "tgi", s.TGIGenerateRequest, r.TGIGenerateResponse, r.TGIStreamEvent, list_response=True),
    Route("post", "/generate", "TGI generate", "tgi", s.TGIGenerateRequest, r.TGIGenerateResponse),
    Route("post", "/generate_stream", "TGI generate, streamed as SSE (no [DONE])", "tgi", s.TGIGenerateRequest,
          event=r.TGIStreamEvent, content_type="text/event-stream"),
    Route("get", "/info", "TGI server info, with the loaded adapters", "tgi", response=r.TGIInfo),
    Route("post", "/tokenize", "TGI tokenize: token ids and offsets of `inputs`", "tgi", s.TokenizeRequest,
          r.TokenizedToken, list_response=True),
    Route("post", "/v1/completions", "OpenAI completions; `model` = adapter or base name", "openai",
          s.CompletionRequest, r.CompletionResponse, r.CompletionChunk),
    Route("post", "/v1/chat/completions", "OpenAI chat completions (the tokenizer's chat template)", "openai",
          s.ChatCompletionRequest, r.ChatCompletionResponse, r.ChatCompletionChunk),
    Route("get", "/v1/models", "OpenAI model list: the base and its adapters (`parent` = base)", "openai",
          response=r.ModelList),
    Route("get", "/v1/models/{model}", "One model card", "openai", response=r.ModelCard),
    Route("get", "/v1/adapters", "Adapters and their state (what the operator reads)", "admin",
          response=r.AdapterList, query=(("since", "`<instance>:<revision>` of an earlier answer: only "
                                                   "the adapters changed since, and the names removed"),)),
    Route("get", "/v1/adapters/{name}", "One adapter", "admin", response=r.AdapterOut),
    Route("post", "/v1/load_lora_adapter", "Load (hot) an adapter (vLLM-compatible)", "admin",
          s.LoadLoraAdapterRequest),
    Route("post", "/v1/unload_lora_adapter", "Unload an adapter (vLLM-compatible)", "admin",
          s.UnloadLoraAdapterRequest),
    Route("get", "/health", "Liveness", "probes"),
    Route("get", "/ready", "Readiness: model loaded and startup adapters tried", "probes"),
    Route("get", "/metrics", "Prometheus metrics (vLLM, TGI and loraplex series; docs/metrics.md)", "probes",
          content_type="text/plain"),
    Route("get", "/openapi.json", "This document", "probes"),
)  # fmt: skip

_ERRORS = {
    "400": "Invalid input (OpenAI routes), unsupported option named in `param`, context length exceeded",
    "401": "Missing or invalid API key",
    "403": "This key may not use the adapter",
    "404": "Unknown adapter or model (never answered by the base model)",
    "422": "Invalid input (TGI and admin routes)",
    "429": "Queue full (see Retry-After)",
    "503": "Shutting down, or the adapter is still loading (see Retry-After)",
}
_PATH_PARAMETERS = {
    "model": "A model id: the base's served name or an adapter's",
    "name": "An adapter's served name",
}


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _success(route: Route) -> dict[str, Any]:
    content: dict[str, Any] = {}
    if route.content_type == "text/plain":
        content["text/plain"] = {"schema": {"type": "string"}}
    elif route.content_type == "application/json":
        schema: dict[str, Any] = _ref(route.response) if route.response else {"type": "object"}
        content["application/json"] = {
            "schema": {"type": "array", "items": schema} if route.list_response else schema
        }
    if route.event is not None:
        content["text/event-stream"] = {
            # One SSE event as Schemathesis and other SSE-aware validators see it: {data, event, id}.
            "schema": {
                "type": "object",
                "properties": {"data": {"type": "string"}},
                "description": "`data: <JSON>` lines, one event each",
            },
            "x-sse-data": _ref(route.event),  # the JSON of each event's `data:` line
        }
    return {"description": "OK", "content": content}


def _operation(route: Route) -> dict[str, Any]:
    error = _ref(r.OpenAIError if route.tag == "openai" else r.TGIError)
    responses: dict[str, Any] = {"200": _success(route)}
    for status, description in _ERRORS.items():
        if (status == "400") != (route.tag == "openai") and status in ("400", "422"):
            continue  # OpenAI routes answer invalid input with 400, the others with 422
        responses[status] = {"description": description, "content": {"application/json": {"schema": error}}}
    operation: dict[str, Any] = {"summary": route.summary, "tags": [route.tag], "responses": responses}
    names = re.findall(r"\{(\w+)\}", route.path)
    parameters = [
        {
            "name": n,
            "in": "path",
            "required": True,
            "description": _PATH_PARAMETERS[n],
            "schema": {"type": "string"},
        }
        for n in names
    ] + [
        {"name": n, "in": "query", "required": False, "description": d, "schema": {"type": "string"}}
        for n, d in route.query
    ]
    if parameters:
        operation["parameters"] = parameters
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": _ref(route.body)}},
        }
    return operation


def _models() -> list[type[BaseModel]]:
    models = {m for route in ROUTES for m in (route.body, route.response, route.event) if m is not None}
    return sorted(models | {r.OpenAIError, r.TGIError}, key=lambda m: m.__name__)


def build_openapi() -> dict[str, Any]:
    _, schemas = models_json_schema(
        [(m, "validation") for m in _models()], ref_template="#/components/schemas/{model}"
    )
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        paths.setdefault(route.path, {})[route.method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "info": {"title": "loraplex inference server", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{}, {"bearer": []}],
    }
