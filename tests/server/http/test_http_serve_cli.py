"""`loraplex serve --demo` as a process: env config, JSON logs, readiness, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest
from http_server_support import call

from loraplex.server.demo_training import TrainedAssets

# The lead wires `serve` into loraplex.cli; this drives the subcommand module the same way.
LAUNCH = (
    "import argparse, sys; from loraplex.server import serve_cli as s; "
    "p = argparse.ArgumentParser(); s.add_arguments(p); sys.exit(s.run(p.parse_args(sys.argv[1:])))"
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def demo_server(trained_assets: TrainedAssets) -> Iterator[tuple[subprocess.Popen, str]]:
    port = _free_port()
    env = {
        **os.environ,
        "LORAPLEX_DEMO_DIR": str(trained_assets.root.parent),  # the trained demo models, cached
        "PORT": str(port),
        "HOSTNAME": "127.0.0.1",
        "MAX_CONCURRENT_REQUESTS": "16",
        "SHUTDOWN_TIMEOUT": "20",
        "SHUTDOWN_DELAY": "3",
    }
    process = subprocess.Popen(
        [sys.executable, "-c", LAUNCH, "--demo"],
        env=env,
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if call("GET", f"{url}/ready")[0] == 200:
                break
        except OSError:
            pass
        time.sleep(0.1)
    else:
        process.kill()
        pytest.fail(f"demo server never became ready: {process.stderr.read()[-2000:]}")
    yield process, url
    if process.poll() is None:
        process.kill()
        process.wait()


def test_demo_serves_its_four_fine_tunes(demo_server: tuple[subprocess.Popen, str]) -> None:
    _, url = demo_server
    status, _, adapters = call("GET", f"{url}/v1/adapters")
    assert status == 200
    names = ("sql", "support", "poem", "haiku")
    assert {a["name"]: a["state"] for a in adapters["data"]} == dict.fromkeys(names, "ready")
    status, _, out = call(
        "POST", f"{url}/generate", {"inputs": "hello", "parameters": {"adapter_id": "poem"}}
    )
    assert status == 200 and isinstance(out["generated_text"], str)


# The README's curl examples, verbatim but for the address and the adapter path (answers left out).
CURL_EXAMPLES = r"""
curl -sf localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "sql", "messages": [{"role": "user", "content": "Which city has the most customers?"}], "max_tokens": 48, "temperature": 0}'
curl -sf localhost:8080/v1/chat/completions -H 'Content-Type: application/json' \
  -d '{"model": "tiny-llama", "messages": [{"role": "user", "content": "Which city has the most customers?"}], "max_tokens": 48, "temperature": 0}'
curl -sf localhost:8080/generate -H 'Content-Type: application/json' \
  -d '{"inputs": "<|bos|><|user|>\nWill it rain tomorrow?<|end|>\n<|assistant|>\n", "parameters": {"adapter_id": "poem", "max_new_tokens": 48}}'
curl -sfN localhost:8080/generate_stream -H 'Content-Type: application/json' \
  -d '{"inputs": "<|bos|><|user|>\nWill it rain tomorrow?<|end|>\n<|assistant|>\n", "parameters": {"adapter_id": "haiku", "max_new_tokens": 8}}'
curl -sf localhost:8080/v1/completions -H 'Content-Type: application/json' \
  -d '{"model": "tiny-llama", "prompt": "The sea absorbs", "max_tokens": 16, "temperature": 0}'
curl -sf localhost:8080/v1/models
curl -sf localhost:8080/v1/adapters
curl -sf localhost:8080/v1/load_lora_adapter -H 'Content-Type: application/json' \
  -d '{"lora_name": "my-adapter", "lora_path": "/path/to/peft-adapter-dir"}'
curl -sf localhost:8080/v1/unload_lora_adapter -H 'Content-Type: application/json' -d '{"lora_name": "my-adapter"}'
curl -sf localhost:8080/metrics
"""


def test_curl_examples(demo_server: tuple[subprocess.Popen, str], trained_assets: TrainedAssets) -> None:
    _, url = demo_server
    script = CURL_EXAMPLES.replace("localhost:8080", url.removeprefix("http://"))
    script = script.replace("/path/to/peft-adapter-dir", str(trained_assets.adapters["haiku"]))
    commands = [c.strip() for c in script.replace("\\\n", " ").strip().splitlines()]
    assert len(commands) == 10
    for command in commands:
        result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
        assert result.stdout.strip(), command
        if "/metrics" not in command and "generate_stream" not in command:
            assert json.loads(result.stdout).get("error") is None, command


def test_sigterm_finishes_in_flight_then_exits(demo_server: tuple[subprocess.Popen, str]) -> None:
    process, url = demo_server
    # ignore_eos: the trained demo models end their answers within a few tokens
    body = {
        "model": "support",
        "prompt": "the model serves",
        "max_tokens": 200,
        "stream": True,
        "ignore_eos": True,
    }
    request = urllib.request.Request(
        f"{url}/v1/completions", json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as stream:
        first = stream.readline()
        assert first.startswith(b"data:")
        process.send_signal(signal.SIGTERM)
        _drains_while_still_serving(url)
        events = [line[5:].strip() for line in stream if line.startswith(b"data:")]
    assert len(events) > 1 and events[-1] == b"[DONE]"  # the stream ran to its end
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert process.wait(timeout=30) == 0
    with pytest.raises(OSError):
        call("GET", f"{url}/health")
    logs = [json.loads(line) for line in process.stderr.read().splitlines() if line.startswith("{")]
    messages = [entry["msg"] for entry in logs]
    assert "serving" in messages and "draining" in messages and "stopped" in messages
    assert messages.index("draining") < messages.index("shutting down")
    assert all({"ts", "level", "logger", "msg"} <= set(entry) for entry in logs)
    access = [e for e in logs if e["msg"] == "request" and e["path"] == "/generate"]
    assert access and access[0]["status"] == 200 and access[0]["method"] == "POST"


def _drains_while_still_serving(url: str) -> None:
    """Right after SIGTERM: /ready says 503 (endpoints drop the pod) yet new requests still work."""
    deadline = time.monotonic() + 2
    while (ready := call("GET", f"{url}/ready"))[0] == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ready[0] == 503 and ready[2]["draining"] is True
    body = {"inputs": "late", "parameters": {"adapter_id": "support", "max_new_tokens": 2}}
    status, _, reply = call("POST", f"{url}/generate", body)
    assert status == 200 and reply["generated_text"] is not None
