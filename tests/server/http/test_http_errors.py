"""Every error case through the real HTTP stack: status codes and both error dialects."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
from http_server_support import LiveServer, ServerThread, call
from huggingface_hub import InferenceClient
from huggingface_hub.errors import ValidationError

from loraplex.server.app import ServerSettings, create_app

TGI_ROUTES = ("/", "/generate", "/generate_stream")


def _tgi_error(status: int, body: object, error_type: str) -> None:
    assert isinstance(body, dict), body
    assert set(body) == {"error", "error_type"}, body
    assert body["error_type"] == error_type, body
    assert body["error"]


def _openai_error(body: object, code: str) -> dict:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["code"] == code and error["message"]
    return error


@pytest.mark.parametrize("route", TGI_ROUTES)
def test_tgi_unknown_adapter_is_404_never_the_base_model(live_server: LiveServer, route: str) -> None:
    body = {
        "inputs": "the model serves",
        "parameters": {"adapter_id": "no-such-adapter", "max_new_tokens": 2},
    }
    status, headers, out = call("POST", live_server.url + route, body)
    assert status == 404
    assert headers["Content-Type"].startswith("application/json")  # not an event stream
    _tgi_error(status, out, "validation")  # a value TGI clients know; the status says "not found"
    assert "no-such-adapter" in out["error"] and "not loaded" in out["error"]


def test_hf_client_sees_unknown_adapter_as_a_validation_error(live_server: LiveServer) -> None:
    client = InferenceClient(base_url=live_server.url)
    with pytest.raises(ValidationError, match="no-such-adapter") as excinfo:
        client.text_generation("hi", adapter_id="no-such-adapter")
    assert excinfo.value.__cause__.response.status_code == 404
    with pytest.raises(ValidationError, match="no-such-adapter"):
        list(client.text_generation("hi", adapter_id="no-such-adapter", stream=True))


def test_openai_unknown_model_is_404(live_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-adapter", prompt="hi", max_tokens=2)
    status, _, out = call("POST", f"{live_server.url}/v1/chat/completions",
                          {"model": "no-such-adapter", "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert status == 404
    assert _openai_error(out, "model_not_found")["param"] == "model"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"parameters": {}}, "inputs"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 0}}, "max_new_tokens"),
        ({"inputs": "hi", "parameters": {"top_p": 1.5}}, "top_p"),
        ({"inputs": "hi", "parameters": {"temperature": -1}}, "temperature"),
        ({"inputs": "hi", "parameters": {"stop": ["a", "b", "c", "d", "e"]}}, "stop"),
        ({"inputs": "hi", "parameters": {"grammar": {"type": "regex", "value": "a+"}}}, "grammar"),
        ({"inputs": "hi", "parameters": {"best_of": 2}}, "best_of"),
        ({"inputs": "the model " * 700, "parameters": {"max_new_tokens": 2}}, "max_input_tokens"),
        ({"inputs": "hi", "parameters": {"max_new_tokens": 5000}}, "max_total_tokens"),
    ],
)
def test_tgi_invalid_input_is_422(live_server: LiveServer, body: dict, fragment: str) -> None:
    for route in TGI_ROUTES:
        status, _, out = call("POST", live_server.url + route, body)
        assert status == 422, (route, out)
        _tgi_error(status, out, "validation")
        assert fragment in out["error"]


def test_malformed_json_is_422_on_tgi_400_on_openai(live_server: LiveServer) -> None:
    status, _, out = call("POST", f"{live_server.url}/generate", b"{not json")
    assert status == 422
    _tgi_error(status, out, "validation")
    status, _, out = call("POST", f"{live_server.url}/v1/completions", b"[1, 2")
    assert status == 400
    assert _openai_error(out, "validation")["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "a4", "prompt": "hi", "n": 0}, "n", "validation"),
        ({"model": "a4", "prompt": "hi", "temperature": 3}, "temperature", "validation"),
        ({"model": "a4", "prompt": []}, "prompt", "validation"),
        ({"model": "a4", "prompt": "hi", "max_tokens": 0}, "max_tokens", "invalid_value"),  # 0 needs echo
        ({"model": "a4", "prompt": "hi", "max_tokens": -1, "echo": True}, "max_tokens", "validation"),
        ({"model": "a4", "prompt": "hi", "prompt_logprobs": 21}, "prompt_logprobs", "validation"),
        (
            {"model": "a4", "prompt": "hi", "prompt_logprobs": 1, "stream": True},
            "prompt_logprobs",
            "invalid_value",
        ),
        ({"model": "a4", "prompt": "hi", "n": 2, "best_of": 1}, "best_of", "invalid_value"),
        ({"model": "a4", "prompt": "hi", "logit_bias": {"5": 1.0}}, "logit_bias", "unsupported"),
        ({"model": "a4", "prompt": "hi", "suffix": "x"}, "suffix", "unsupported"),
    ],
)
def test_openai_invalid_input_is_400(live_server: LiveServer, body: dict, param: str, code: str) -> None:
    status, _, out = call("POST", f"{live_server.url}/v1/completions", body)
    assert status == 400, out
    error = _openai_error(out, code)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code == "unsupported":
        assert f"`{param}`" in error["message"]


def test_chat_rejects_tools_and_non_text_parts(live_server: LiveServer) -> None:
    url = f"{live_server.url}/v1/chat/completions"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    status, _, out = call(
        "POST", url, {"model": "a4", "messages": [{"role": "user", "content": "x"}], "tools": tools}
    )
    assert status == 400 and _openai_error(out, "unsupported")["param"] == "tools"
    for name, value in (("response_format", {"type": "json_object"}), ("tool_choice", "required")):
        body = {"model": "a4", "messages": [{"role": "user", "content": "x"}], name: value}
        status, _, out = call("POST", url, body)
        assert status == 400 and _openai_error(out, "unsupported")["param"] == name, out
    image = [{"type": "image_url", "image_url": {"url": "http://x"}}]
    status, _, out = call("POST", url, {"model": "a4", "messages": [{"role": "user", "content": image}]})
    assert status == 400 and _openai_error(out, "invalid_value")["param"] == "messages"


def test_unknown_route_and_wrong_method(live_server: LiveServer) -> None:
    status, _, out = call("GET", f"{live_server.url}/no/such/route")
    assert status == 404
    _tgi_error(status, out, "not_found")
    status, _, out = call("GET", f"{live_server.url}/generate")
    assert status == 405
    _tgi_error(status, out, "http_error")


@pytest.fixture(scope="module")
def keyed_url(live_server: LiveServer, server_thread: ServerThread) -> Iterator[str]:
    """A second app with API_KEY set, over the same engine."""
    yield server_thread.start(create_app(live_server.engine, ServerSettings(api_key="s3cret")))


GENERATE = {"inputs": "the model serves", "parameters": {"adapter_id": "a4", "max_new_tokens": 2}}
LOAD = {"lora_name": "x", "lora_path": "/nonexistent"}


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/generate", GENERATE),
        ("POST", "/", GENERATE),
        ("GET", "/info", None),
        ("GET", "/v1/adapters", None),
        ("GET", "/v1/adapters/a4", None),
        ("POST", "/v1/load_lora_adapter", LOAD),
        ("POST", "/v1/unload_lora_adapter", {"lora_name": "a4"}),
    ],
)
def test_api_key_required(keyed_url: str, method: str, path: str, body: dict | None) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        status, response_headers, out = call(method, keyed_url + path, body, headers)
        assert status == 401, (path, headers)
        _tgi_error(status, out, "authentication")
        assert response_headers["WWW-Authenticate"] == "Bearer"


def test_api_key_accepted_and_probes_open(keyed_url: str) -> None:
    auth = {"Authorization": "Bearer s3cret"}
    assert call("POST", f"{keyed_url}/generate", GENERATE, auth)[0] == 200
    assert call("GET", f"{keyed_url}/v1/adapters", None, auth)[0] == 200
    for path in ("/health", "/ready", "/metrics", "/openapi.json"):
        assert call("GET", keyed_url + path)[0] == 200, path
    # the clients send the key their own way
    hf = InferenceClient(base_url=keyed_url, api_key="s3cret")
    assert isinstance(hf.text_generation("the model serves", adapter_id="a4", max_new_tokens=2), str)
    good = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="s3cret", max_retries=0)
    assert good.completions.create(model="a4", prompt="hi", max_tokens=2).choices[0].text is not None
    bad = openai.OpenAI(base_url=f"{keyed_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="a4", prompt="hi", max_tokens=2)
    status, _, out = call("POST", f"{keyed_url}/v1/completions", {"model": "a4", "prompt": "hi"})
    assert status == 401
    _openai_error(out, "authentication")
