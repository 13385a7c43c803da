"""/openapi.json is true: real responses of the running server validate against it (jsonschema)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

import jsonschema
import pytest
from http_server_support import PROMPTS, LiveServer, call

from loraplex.server.api_schemas import UNSUPPORTED

CHAT = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def document(live_server: LiveServer) -> dict[str, Any]:
    status, _, document = call("GET", f"{live_server.url}/openapi.json")
    assert status == 200
    return document


def _raw(url: str, method: str, body: Any) -> tuple[int, str, bytes]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


def _validate(document: dict, path: str, method: str, status: int, content_type: str, raw: bytes) -> int:
    """Validate one response; the number of JSON values checked."""
    response = document["paths"][path][method]["responses"][str(status)]
    media = content_type.split(";")[0]
    declared = response["content"][media]
    if media == "text/event-stream":
        schema = declared["x-sse-data"]
        values = [line[5:].strip() for line in raw.decode().splitlines() if line.startswith("data:")]
        values = [json.loads(v) for v in values if v != "[DONE]"]
    elif media == "application/json":
        schema, values = declared["schema"], [json.loads(raw)]
    else:
        assert declared["schema"]["type"] == "string"
        return 1
    validator = jsonschema.Draft202012Validator({**schema, "components": document["components"]})
    for value in values:
        validator.validate(value)
    return len(values)


CASES = [
    ("post", "/", {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 3, "details": True}}, 200),
    ("post", "/", {"inputs": PROMPTS[0], "parameters": {"max_new_tokens": 3}, "stream": True}, 200),
    ("post", "/generate", {"inputs": PROMPTS[1], "parameters": {"adapter_id": "a4", "max_new_tokens": 3,
                                                                 "details": True, "top_n_tokens": 2}}, 200),
    ("post", "/generate", {"inputs": PROMPTS[1], "parameters": {"max_new_tokens": 3, "best_of": 2,
                                                                 "do_sample": True, "details": True}}, 200),
    ("post", "/generate", {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 2, "best_of": 2, "do_sample": True,
                                                                 "details": True, "decoder_input_details": True}}, 200),
    ("post", "/generate_stream", {"inputs": PROMPTS[2], "parameters": {"decoder_input_details": True}}, 422),
    ("post", "/generate", {"inputs": PROMPTS[1], "parameters": {"adapter_id": "nope"}}, 404),
    ("post", "/generate", {"inputs": PROMPTS[1], "parameters": {"top_p": 3}}, 422),
    ("post", "/generate_stream", {"inputs": PROMPTS[2], "parameters": {"max_new_tokens": 3, "details": True}}, 200),
    ("get", "/info", None, 200),
    ("post", "/tokenize", {"inputs": PROMPTS[0]}, 200),
    ("post", "/v1/completions", {"model": "b8", "prompt": [PROMPTS[0], PROMPTS[1]], "max_tokens": 3, "n": 2,
                                 "logprobs": 1}, 200),
    ("post", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 3, "stream": True,
                                 "stream_options": {"include_usage": True}}, 200),
    ("post", "/v1/completions", {"model": "a4", "prompt": PROMPTS[1], "max_tokens": 2, "echo": True, "logprobs": 2,
                                 "prompt_logprobs": 3}, 200),
    ("post", "/v1/completions", {"prompt": [PROMPTS[0], PROMPTS[2]], "max_tokens": 0, "echo": True, "logprobs": 1}, 200),
    ("post", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 2, "echo": True, "logprobs": 1, "stream": True}, 200),
    ("post", "/v1/completions", {"prompt": PROMPTS[0], "stream": True, "prompt_logprobs": 1}, 400),
    ("post", "/v1/completions", {"model": "nope", "prompt": "x"}, 404),
    ("post", "/v1/completions", {"prompt": "x", "logit_bias": {"1": 2}}, 400),
    ("post", "/v1/chat/completions", {"model": "c16", "messages": CHAT, "max_tokens": 3, "logprobs": True}, 200),
    ("post", "/v1/chat/completions", {"messages": CHAT, "max_tokens": 3, "stream": True, "n": 2}, 200),
    ("post", "/v1/chat/completions", {"model": "b8", "messages": CHAT, "max_tokens": 2, "prompt_logprobs": 2}, 200),
    ("get", "/v1/models", None, 200),
    ("get", "/v1/models/a4", None, 200),
    ("get", "/v1/models/nope", None, 404),
    ("get", "/v1/adapters", None, 200),
    ("get", "/v1/adapters/b8", None, 200),
    ("get", "/v1/adapters/nope", None, 404),
    ("get", "/metrics", None, 200),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "body", "status"), CASES)
def test_real_responses_validate(
    live_server: LiveServer, document: dict, method: str, path: str, body: Any, status: int
) -> None:
    got, content_type, raw = _raw(live_server.url + path, method.upper(), body)
    assert got == status, raw[:300]
    template = {"/v1/models/a4": "/v1/models/{model}", "/v1/models/nope": "/v1/models/{model}",
                "/v1/adapters/b8": "/v1/adapters/{name}", "/v1/adapters/nope": "/v1/adapters/{name}"}.get(path, path)  # fmt: skip
    assert _validate(document, template, method, status, content_type, raw) >= 1


def test_document_declares_parameters_content_types_and_unsupported(document: dict) -> None:
    paths = document["paths"]
    for path, name in (("/v1/models/{model}", "model"), ("/v1/adapters/{name}", "name")):
        [parameter] = paths[path]["get"]["parameters"]
        assert (parameter["name"], parameter["in"], parameter["required"]) == (name, "path", True)
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    root = paths["/"]["post"]["responses"]["200"]["content"]
    assert root["application/json"]["schema"]["type"] == "array"
    assert root["text/event-stream"]["x-sse-data"]["$ref"].endswith("/TGIStreamEvent")
    schemas = document["components"]["schemas"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    for name in ("tools", "response_format", "logit_bias", "tool_choice"):
        assert chat[name][UNSUPPORTED] is True, name
    assert UNSUPPORTED not in chat["temperature"]
    for model, name in (("ChatCompletionRequest", "prompt_logprobs"), ("CompletionRequest", "prompt_logprobs"),
                        ("CompletionRequest", "echo"), ("TGIParameters", "decoder_input_details")):  # fmt: skip
        assert UNSUPPORTED not in schemas[model]["properties"][name], (model, name)
    assert "prompt_logprobs" in schemas["CompletionChoice"]["properties"]
    assert "prompt_logprobs" in schemas["ChatCompletionResponse"]["properties"]
    assert "model" not in schemas["ChatCompletionRequest"].get("required", [])
