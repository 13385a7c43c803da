"""Per-adapter access keys through the real server and unchanged clients (InferenceClient, openai).

A second app over the shared engine: deployment key set, `a4` opened by team A's key, `b8` by
team B's, the rest following the deployment key. The keys file is swapped like a Secret mount.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from http_server_support import LiveServer, ServerThread, call
from huggingface_hub import InferenceClient
from huggingface_hub.errors import HfHubHTTPError, TextGenerationError

from loraplex.server.app import ServerSettings, create_app
from loraplex.server.auth import digest_key

DEPLOYMENT_KEY = "deploy-6c1f0b2a9e"
KEY_A = "team-a-4f8e2d7c1b"
KEY_A_ROTATED = "team-a-rotated-93d1aa"
KEY_B = "team-b-7a2c9e0f5d"
SALT = bytes.fromhex("00112233445566778899aabbccddeeff")
ALL_SECRETS = (DEPLOYMENT_KEY, KEY_A, KEY_A_ROTATED, KEY_B)


OPEN = ["c16", "a4-copy", "c16-copy"]


def _keys_document(keys: dict[str, list[str]], open_names: list[str] = OPEN) -> str:
    adapters = {name: [digest_key(SALT, key) for key in values] for name, values in keys.items()}
    return json.dumps({"salt": SALT.hex(), "adapters": adapters, "open": open_names})


def _publish(directory: Path, text: str) -> None:
    """Write the file the way the kubelet updates a Secret volume: a new dir, one symlink swap."""
    version = directory / f"..{time.monotonic_ns()}"
    version.mkdir()
    (version / "keys.json").write_text(text)
    link = directory / "..data.tmp"
    link.symlink_to(version.name)
    os.replace(link, directory / "..data")
    if not (directory / "keys.json").is_symlink():
        (directory / "keys.json").symlink_to("..data/keys.json")


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("access")
    _publish(directory, _keys_document({"a4": [KEY_A], "b8": [KEY_B]}))
    return directory


@pytest.fixture(scope="module")
def url(live_server: LiveServer, server_thread: ServerThread, keys_dir: Path) -> Iterator[str]:
    settings = ServerSettings(
        api_key=DEPLOYMENT_KEY, adapter_keys_file=str(keys_dir / "keys.json"), adapter_keys_poll_s=0.05
    )
    yield server_thread.start(create_app(live_server.engine, settings))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _generate(adapter: str) -> dict:
    return {"inputs": "the model serves", "parameters": {"adapter_id": adapter, "max_new_tokens": 2}}


def _hf_status(client: InferenceClient, adapter: str) -> int:
    try:
        client.text_generation("the model serves", adapter_id=adapter, max_new_tokens=2)
    except HfHubHTTPError as error:
        return error.response.status_code
    except TextGenerationError as error:  # the client maps TGI's error_type; the status is the cause's
        assert isinstance(error.__cause__, HfHubHTTPError)
        return error.__cause__.response.status_code
    return 200


def test_tgi_routes_with_inference_client(url: str) -> None:
    assert _hf_status(InferenceClient(base_url=url, api_key=KEY_A), "a4") == 200
    assert _hf_status(InferenceClient(base_url=url, api_key=KEY_B), "a4") == 403
    assert _hf_status(InferenceClient(base_url=url, api_key=DEPLOYMENT_KEY), "a4") == 403
    assert _hf_status(InferenceClient(base_url=url), "a4") == 401
    assert _hf_status(InferenceClient(base_url=url, api_key="not-a-key"), "a4") == 401
    # adapters without access keys follow the deployment key
    assert _hf_status(InferenceClient(base_url=url, api_key=DEPLOYMENT_KEY), "c16") == 200
    assert _hf_status(InferenceClient(base_url=url, api_key=KEY_A), "c16") == 403
    for path in ("/generate", "/generate_stream"):
        assert call("POST", url + path, _generate("b8"), _bearer(KEY_B))[0] == 200
        assert call("POST", url + path, _generate("b8"), _bearer(KEY_A))[0] == 403
        assert call("POST", url + path, _generate("b8"))[0] == 401


def test_openai_routes_with_openai_client(url: str) -> None:
    def client(key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)

    text = client(KEY_A).completions.create(model="a4", prompt="hi", max_tokens=2).choices[0].text
    assert isinstance(text, str)
    chat = client(KEY_B).chat.completions.create(
        model="b8", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert chat.choices[0].message.content is not None
    with pytest.raises(openai.PermissionDeniedError):
        client(KEY_B).completions.create(model="a4", prompt="hi", max_tokens=2)
    with pytest.raises(openai.PermissionDeniedError):
        client(KEY_A).chat.completions.create(
            model="b8", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    with pytest.raises(openai.AuthenticationError):
        client("not-a-key").completions.create(model="a4", prompt="hi", max_tokens=2)
    status, _, out = call("POST", f"{url}/v1/completions", {"model": "a4", "prompt": "hi", "max_tokens": 2})
    assert status == 401 and out["error"]["type"] == "authentication_error"


def test_models_list_only_what_the_caller_may_use(url: str) -> None:
    def models(key: str) -> set[str]:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        return {model.id for model in client.models.list()}

    assert models(KEY_A) == {"a4"}
    assert models(KEY_B) == {"b8"}
    assert models(DEPLOYMENT_KEY) == {"tiny-llama", "c16", "a4-copy", "c16-copy"}
    assert call("GET", f"{url}/v1/models/b8", None, _bearer(KEY_A))[0] == 404


def test_admin_routes_need_the_deployment_key(url: str) -> None:
    assert call("GET", f"{url}/v1/adapters", None, _bearer(KEY_A))[0] == 403
    assert call("POST", f"{url}/v1/unload_lora_adapter", {"lora_name": "a4"}, _bearer(KEY_A))[0] == 403
    assert call("GET", f"{url}/v1/adapters", None, _bearer(DEPLOYMENT_KEY))[0] == 200


def _wait_status(url: str, key: str, expected: int) -> None:
    _wait_for(url, "a4", key, expected)


def _wait_for(url: str, adapter: str, key: str, expected: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (status := call("POST", f"{url}/generate", _generate(adapter), _bearer(key))[0]) != expected:
        assert time.monotonic() < deadline, f"still {status}, wanted {expected}"
        time.sleep(0.05)


def test_adapters_the_file_does_not_name_are_closed(url: str, keys_dir: Path) -> None:
    """An adapter loaded before the mounted file lists it must not be open meanwhile."""
    _publish(keys_dir, _keys_document({"a4": [KEY_A], "b8": [KEY_B]}, open_names=["c16"]))
    deadline = time.monotonic() + 10
    while call("POST", f"{url}/generate", _generate("a4-copy"), _bearer(DEPLOYMENT_KEY))[0] != 403:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert call("POST", f"{url}/generate", _generate("c16"), _bearer(DEPLOYMENT_KEY))[0] == 200
    # ... and reported `loading` meanwhile, so the operator never calls it Ready too early
    report = call("GET", f"{url}/v1/adapters/a4-copy", None, _bearer(DEPLOYMENT_KEY))[2]
    assert (report["state"], report["access"]) == ("loading", "pending")
    listed = call("GET", f"{url}/v1/adapters", None, _bearer(DEPLOYMENT_KEY))[2]["data"]
    states = {item["name"]: (item["state"], item["access"]) for item in listed}
    assert states["c16"] == ("ready", "open") and states["a4"] == ("ready", "protected")
    _publish(keys_dir, _keys_document({"a4": [KEY_A], "b8": [KEY_B]}))
    _wait_for(url, "a4-copy", DEPLOYMENT_KEY, 200)
    report = call("GET", f"{url}/v1/adapters/a4-copy", None, _bearer(DEPLOYMENT_KEY))[2]
    assert (report["state"], report["access"]) == ("ready", "open")


def test_rotation_takes_effect_without_restart(url: str, keys_dir: Path) -> None:
    _publish(keys_dir, _keys_document({"a4": [KEY_A_ROTATED], "b8": [KEY_B]}))
    _wait_status(url, KEY_A_ROTATED, 200)
    assert call("POST", f"{url}/generate", _generate("a4"), _bearer(KEY_A))[0] == 401
    # an unreadable file keeps the last good keys: no fail-open, no lock-out
    (keys_dir / "..data").unlink()
    time.sleep(0.2)
    assert call("POST", f"{url}/generate", _generate("a4"), _bearer(KEY_A_ROTATED))[0] == 200
    _publish(keys_dir, _keys_document({"a4": [KEY_A], "b8": [KEY_B]}))
    _wait_status(url, KEY_A, 200)


def test_missing_keys_file_fails_closed(
    live_server: LiveServer, server_thread: ServerThread, tmp_path: Path
) -> None:
    settings = ServerSettings(adapter_keys_file=str(tmp_path / "absent.json"))
    closed = server_thread.start(create_app(live_server.engine, settings))
    assert call("POST", f"{closed}/generate", _generate("c16"))[0] == 401
    assert call("POST", f"{closed}/generate", {"inputs": "hi", "parameters": {"max_new_tokens": 2}})[0] == 200


def test_token_usage_per_adapter(url: str) -> None:
    before = _usage(url, "b8")
    status, headers, _ = call("POST", f"{url}/generate", _generate("b8"), _bearer(KEY_B))
    assert status == 200
    prompt, generated = int(headers["x-prompt-tokens"]), int(headers["x-generated-tokens"])
    assert _usage(url, "b8") == (before[0] + prompt, before[1] + generated)
    metrics = call("GET", f"{url}/metrics")[2]
    assert f'loraplex_adapter_prompt_tokens_total{{adapter="b8"}} {float(before[0] + prompt)}' in metrics
    assert (
        f'loraplex_adapter_generation_tokens_total{{adapter="b8"}} {float(before[1] + generated)}' in metrics
    )


def _usage(url: str, adapter: str) -> tuple[int, int]:
    out = call("GET", f"{url}/v1/adapters/{adapter}", None, _bearer(DEPLOYMENT_KEY))[2]
    return out["prompt_tokens"], out["generated_tokens"]


def test_no_key_material_in_logs_metrics_or_errors(url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = [
        call("POST", f"{url}/generate", _generate("a4"), _bearer(key))[2] for key in (KEY_B, "x", KEY_A)
    ]
    bodies.append(call("POST", f"{url}/v1/completions", {"model": "b8", "prompt": "hi"}, _bearer(KEY_A))[2])
    bodies.append(call("GET", f"{url}/v1/adapters", None, _bearer(DEPLOYMENT_KEY))[2])
    text = "\n".join(
        [json.dumps(body) for body in bodies]
        + [call("GET", f"{url}/metrics")[2]]
        + [record.getMessage() + json.dumps(record.__dict__, default=str) for record in caplog.records]
    )
    digests = [digest_key(SALT, key) for key in ALL_SECRETS]
    for secret in (*ALL_SECRETS, *digests, SALT.hex()):
        assert secret not in text
