"""Fixtures of the HTTP tests: one shared live server (real engine, tiny Llama), the reference, and
the clients users run (`text-generation`, `openai`, `huggingface_hub`) pointed at it."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest
import text_generation
from http_server_support import LiveServer, Reference, ServerThread, five_adapters, start_server
from huggingface_hub import InferenceClient

from loraplex.server.demo_assets import TinyAssets


@pytest.fixture(scope="session")
def server_thread() -> Iterator[ServerThread]:
    thread = ServerThread()
    yield thread
    thread.close()


@pytest.fixture(scope="session")
def live_server(server_thread: ServerThread, tiny_assets: TinyAssets) -> Iterator[LiveServer]:
    """The shared server: five adapters over four GPU slots, room for 256 requests in flight."""
    server = start_server(server_thread, tiny_assets, five_adapters(tiny_assets), max_concurrent_requests=256)
    yield server
    server_thread.run(server.engine.shutdown(timeout_s=2.0))


@pytest.fixture(scope="session")
def reference(tiny_assets: TinyAssets) -> Reference:
    return Reference(tiny_assets, five_adapters(tiny_assets))


@pytest.fixture(scope="session")
def tgi(live_server: LiveServer) -> text_generation.Client:
    """TGI's own client on the shared server."""
    return text_generation.Client(live_server.url, timeout=60)


@pytest.fixture(scope="session")
def oai(live_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live_server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def hf(live_server: LiveServer) -> InferenceClient:
    return InferenceClient(base_url=live_server.url)
