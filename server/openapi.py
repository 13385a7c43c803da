"""The OpenAPI document served at `/openapi.json`, built from the route table and the pydantic bodies.

Request bodies are single-sourced from `api_schemas`; a test checks that every route the app
registers is described here, so the document cannot drift from the router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loraplex.server import api_schemas as s
from loraplex.version import __version__


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    summary: str
    tag: str
    body: type[BaseModel] | None = None
    streams: bool = False  # may answer with Server-Sent Events


ROUTES: tuple[Route, ...] = (
    Route("post", "/", "TGI compat generate (InferenceClient.text_generation); `stream` for SSE", "tgi",
          s.TGIGenerateRequest, streams=True),
    Route("post", "/generate", "TGI generate", "tgi", s.TGIGenerateRequest),
    Route("post", "/generate_stream", "TGI generate, streamed as SSE (no [DONE])", "tgi", s.TGIGenerateRequest,
          streams=True),
    Route("get", "/info", "TGI server info, with the loaded adapters", "tgi"),
    Route("post", "/v1/completions", "OpenAI completions; `model` = adapter or base name", "openai",
          s.CompletionRequest, streams=True),
    Route("post", "/v1/chat/completions", "OpenAI chat completions (the tokenizer's chat template)", "openai",
          s.ChatCompletionRequest, streams=True),
    Route("get", "/v1/models", "OpenAI model list: the base and its adapters (`parent` = base)", "openai"),
    Route("get", "/v1/models/{model}", "One model card", "openai"),
    Route("get", "/v1/adapters", "Adapters and their state (what the operator reads)", "admin"),
    Route("get", "/v1/adapters/{name}", "One adapter", "admin"),
    Route("post", "/v1/load_lora_adapter", "Load (hot) an adapter (vLLM-compatible)", "admin",
          s.LoadLoraAdapterRequest),
    Route("post", "/v1/unload_lora_adapter", "Unload an adapter (vLLM-compatible)", "admin",
          s.UnloadLoraAdapterRequest),
    Route("get", "/health", "Liveness", "probes"),
    Route("get", "/ready", "Readiness: model loaded and startup adapters tried", "probes"),
    Route("get", "/metrics", "Prometheus metrics (vLLM gauge names included)", "probes"),
    Route("get", "/openapi.json", "This document", "probes"),
)  # fmt: skip

_ERRORS = {
    "401": "Missing or invalid API key",
    "404": "Unknown adapter or model (never answered by the base model)",
    "422": "Invalid input",
    "429": "Queue full (see Retry-After)",
    "503": "Shutting down, or the adapter is still loading (see Retry-After)",
}
_ERROR_SCHEMA = {
    "type": "object",
    "description": "TGI and admin routes: {error, error_type}; OpenAI routes: {error: {message, type, param, code}}",
}


def _operation(route: Route) -> dict[str, Any]:
    # The TGI compat route `POST /` answers a one-element list when not streaming.
    body_schema = {"type": ["object", "array"]} if route.path == "/" else {"type": "object"}
    content: dict[str, Any] = {"application/json": {"schema": body_schema}}
    if route.path == "/metrics":
        content = {"text/plain": {"schema": {"type": "string"}}}  # Prometheus text format
    if route.streams:  # each SSE event: {data, event, id, retry}, `data` the JSON text (or [DONE])
        content["text/event-stream"] = {
            "schema": {"type": "object", "properties": {"data": {"type": "string"}}}
        }
    responses: dict[str, Any] = {"200": {"description": "OK", "content": content}}
    for status, description in _ERRORS.items():
        responses[status] = {
            "description": description,
            "content": {"application/json": {"schema": _ERROR_SCHEMA}},
        }
    operation: dict[str, Any] = {"summary": route.summary, "tags": [route.tag], "responses": responses}
    if route.body is not None:
        ref = {"$ref": f"#/components/schemas/{route.body.__name__}"}
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref}}}
    return operation


def build_openapi() -> dict[str, Any]:
    models = sorted({r.body for r in ROUTES if r.body is not None}, key=lambda m: m.__name__)
    _, schemas = models_json_schema(
        [(m, "validation") for m in models], ref_template="#/components/schemas/{model}"
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
