"""Loads that always finish (issue 15): a client that hangs up mid-download does not leave the
adapter `loading`; a download cut off ends `failed` with the reason; no staging leftovers."""

from __future__ import annotations

import asyncio
import http.client
import io
import json
import socket
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

import pytest
from aiohttp import web
from http_server_support import LiveServer, ServerThread, call, start_server

from loraplex.server.demo_assets import TinyAssets


def _tarball(directory: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(directory / name, arcname=name)
    return buffer.getvalue()


def _slow_app(payload: bytes, seconds: float, cut_at: int | None = None) -> web.Application:
    """Serves `payload` in 16 pieces over `seconds`; with `cut_at`, drops the connection there."""

    async def serve(http: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(payload))})
        await response.prepare(http)
        piece = max(1, len(payload) // 16)
        for start in range(0, len(payload), piece):
            if cut_at is not None and start >= cut_at:
                http.transport.close()  # type: ignore[union-attr]
                return response
            await response.write(payload[start : start + piece])
            await asyncio.sleep(seconds / 16)
        return response

    app = web.Application()
    app.router.add_get("/adapter.tar.gz", serve)
    return app


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("adapter-cache")


@pytest.fixture(scope="module")
def server(server_thread: ServerThread, tiny_assets: TinyAssets, cache_dir: Path) -> Iterator[LiveServer]:
    live = start_server(server_thread, tiny_assets, {}, adapter_cache_dir=str(cache_dir))
    yield live
    server_thread.run(live.engine.shutdown(timeout_s=2.0))


def _hang_up_after(url: str, body: dict, seconds: float) -> None:
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=seconds)
    connection.request(
        "POST", "/v1/load_lora_adapter", json.dumps(body), {"Content-Type": "application/json"}
    )
    with pytest.raises((TimeoutError, socket.timeout)):
        connection.getresponse()
    connection.close()  # the client is gone while the download runs


def _settled(url: str, name: str, timeout_s: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, _, info = call("GET", f"{url}/v1/adapters/{name}")
        if status == 200 and info["state"] != "loading":
            return info
        time.sleep(0.05)
    raise AssertionError(f"{name} still loading after {timeout_s} s")


def _leftovers(cache_dir: Path) -> list[Path]:
    return list(cache_dir.rglob(".fetch-*"))


def test_a_load_whose_client_hangs_up_still_finishes(server, server_thread, tiny_assets, cache_dir) -> None:
    source = server_thread.start(_slow_app(_tarball(tiny_assets.adapters["llama"]["b8"]), seconds=1.5))
    _hang_up_after(server.url, {"lora_name": "slow", "lora_path": f"{source}/adapter.tar.gz"}, 0.3)
    info = _settled(server.url, "slow")
    assert info["state"] == "ready", info
    status, _, body = call(
        "POST",
        f"{server.url}/generate",
        {"inputs": "x", "parameters": {"adapter_id": "slow", "max_new_tokens": 2}},
    )
    assert status == 200, body
    assert not _leftovers(cache_dir)


def test_a_download_cut_off_ends_failed_with_the_reason(
    server, server_thread, tiny_assets, cache_dir
) -> None:
    payload = _tarball(tiny_assets.adapters["llama"]["c16"])
    source = server_thread.start(_slow_app(payload, seconds=0.8, cut_at=len(payload) // 2))
    _hang_up_after(server.url, {"lora_name": "cut", "lora_path": f"{source}/adapter.tar.gz"}, 0.2)
    info = _settled(server.url, "cut")
    assert info["state"] == "failed" and info["error_type"] == "adapter_download", info
    assert "interrupted" in info["error"] or "IncompleteRead" in info["error"], info
    assert not _leftovers(cache_dir)
