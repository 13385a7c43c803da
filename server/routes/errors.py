"""One error type for every route, rendered in the caller's dialect by a middleware.

Handlers raise `ApiError` (or let engine and validation errors through); `error_middleware`
turns them into TGI's `{"error", "error_type"}` or OpenAI's `{"error": {message, type, param,
code}}` depending on the route family. OpenAI routes answer invalid input with 400 (what the
OpenAI SDK raises `BadRequestError` for), the others with TGI's 422. On TGI's generation routes
`error_type` is one of the four values TGI clients know (`validation`, `generation`,
`overloaded`, `incomplete_generation`); the status (404 for an unknown adapter) and the message
keep the specific reason.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import pydantic
from aiohttp import web

from loraplex.server.engine_api import (
    AdapterLoadError,
    EngineError,
    InvalidRequestError,
    QueueFullError,
    ShuttingDownError,
    UnknownAdapterError,
)
from loraplex.server.routes.blocking import INLINE_JSON_BYTES

log = logging.getLogger(__name__)

# Paths answered in OpenAI's error dialect; everything else uses TGI's.
OPENAI_PATH_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models")
# TGI's generation routes, whose clients parse `error_type` (text_generation, huggingface_hub).
TGI_GENERATION_PATHS = frozenset({"/", "/generate", "/generate_stream", "/tokenize"})
# status -> the TGI error_type a TGI client turns into its typed exception
_TGI_TYPES = {
    400: "validation",
    404: "validation",
    413: "validation",
    422: "validation",
    429: "overloaded",
    500: "generation",
    503: "overloaded",
}

# status -> OpenAI `type` (clients switch on the status code, humans read the type)
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}

# AdapterLoadError.error_type values that are the caller's fault (4xx), the rest are ours (5xx).
_LOAD_CLIENT_ERRORS = {
    "validation": 422,
    "not_found": 404,
    "source": 422,
    "conflict": 409,
    "name_conflict": 409,
    "capacity": 507,
    "rank_exceeds_base": 422,
    "base_model_mismatch": 422,
    "integrity": 422,
    "rank_exceeds_max": 422,
    "unknown_target_module": 422,
    "shape_mismatch": 422,
    "corrupt_file": 422,
    "unsupported": 422,
    "too_large": 413,
    "adapter_not_found": 404,  # nothing at the adapter's source
    "credentials": 403,  # the store refused (or found no) credentials for the source
    "adapter_download": 502,  # the source's server failed us
}


@dataclass
class ApiError(Exception):
    status: int
    message: str
    error_type: str
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def from_engine_error(exc: EngineError) -> ApiError:
    """Map a typed engine error to its HTTP status (DESIGN.md §4)."""
    message = str(exc) or exc.error_type
    match exc:
        case UnknownAdapterError():
            return ApiError(404, message, exc.error_type, param="adapter")
        case InvalidRequestError():
            return ApiError(422, message, exc.error_type)
        case QueueFullError():
            retry_after = str(max(1, math.ceil(exc.retry_after_s)))
            return ApiError(429, message, exc.error_type, headers={"Retry-After": retry_after})
        case ShuttingDownError():
            return ApiError(503, message, exc.error_type, headers={"Retry-After": "1"})
        case AdapterLoadError():
            return ApiError(_LOAD_CLIENT_ERRORS.get(exc.error_type, 500), message, exc.error_type)
    return ApiError(500, message, exc.error_type)


def from_validation_error(exc: pydantic.ValidationError) -> ApiError:
    """First problem only, phrased like `parameters.top_p: Input should be ...`."""
    first = exc.errors(include_url=False)[0]
    where = ".".join(str(part) for part in first["loc"])
    message = f"{where}: {first['msg']}" if where else first["msg"]
    param = str(first["loc"][0]) if first["loc"] else None  # the body field, not union member tags
    return ApiError(422, message, "validation", param=param)


def is_openai_path(path: str) -> bool:
    return path.startswith(OPENAI_PATH_PREFIXES)


def openai_error_body(error: ApiError) -> dict[str, object]:
    return {
        "error": {
            "message": error.message,
            "type": _OPENAI_TYPES.get(error.status, "server_error"),
            "param": error.param,
            "code": error.error_type,
        }
    }


def tgi_error_type(error: ApiError) -> str:
    if error.status in _TGI_TYPES:
        return _TGI_TYPES[error.status]
    return "generation" if error.status >= 500 else error.error_type  # 401/403 keep theirs


def render(error: ApiError, path: str) -> web.Response:
    """`error` in the dialect of the route family `path` belongs to."""
    status = error.status
    if is_openai_path(path):
        status = 400 if status == 422 else status  # OpenAI's status for invalid input
        body: dict[str, object] = openai_error_body(error)
    elif path in TGI_GENERATION_PATHS:
        body = {"error": error.message, "error_type": tgi_error_type(error)}
    else:
        body = {"error": error.message, "error_type": error.error_type}
    return web.json_response(body, status=status, headers=error.headers)


def _as_api_error(exc: Exception) -> ApiError | None:
    match exc:
        case ApiError():
            return exc
        case EngineError():
            return from_engine_error(exc)
        case pydantic.ValidationError():
            return from_validation_error(exc)
        case web.HTTPException() if exc.status >= 400:
            error_type = "not_found" if exc.status == 404 else "http_error"
            return ApiError(exc.status, exc.reason, error_type, headers=dict(exc.headers))
    return None


@web.middleware
async def error_middleware(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        error = _as_api_error(exc)
        if error is None:
            if isinstance(exc, web.HTTPException):
                raise
            log.exception("unhandled error on %s %s", request.method, request.path)
            error = ApiError(500, "internal server error", "internal")
        error.headers.pop("Content-Type", None)
        return render(error, request.path)


async def read_json(request: web.Request) -> object:
    """The request body as JSON, or a 422 that says why not; 413 before reading a body that is
    too large (see `blocking.body_limit`); large bodies are parsed off the event loop."""
    from loraplex.server.routes.context import CONTEXT  # context -> auth -> errors: import late

    ctx = request.app[CONTEXT]
    if (request.content_length or 0) > ctx.body_limit:
        raise _too_large(request.content_length, ctx.body_limit)
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:  # a chunked body that ran past the limit
        raise _too_large(None, ctx.body_limit) from exc
    try:
        if len(raw) > INLINE_JSON_BYTES:
            return await ctx.blocking.run(json.loads, raw)
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, too deep, a 5000-digit integer
        raise ApiError(422, f"request body is not valid JSON: {exc}", "validation") from exc


def _too_large(size: int | None, limit: int) -> ApiError:
    what = f"{size} bytes" if size is not None else "the request body"
    return ApiError(
        413, f"{what} is over the {limit}-byte body limit (set by MAX_INPUT_TOKENS)", "payload_too_large"
    )
