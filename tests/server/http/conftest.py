"""Fixtures of the HTTP tests: one shared live server (real engine, tiny Llama) and the reference."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from http_server_support import LiveServer, Reference, ServerThread, five_adapters, start_server

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
