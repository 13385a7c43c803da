"""EngineClient against a small real aiohttp server speaking the admin API (DESIGN.md §4)."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import (
    AdapterRejected,
    EngineBusy,
    EngineClient,
    EngineHTTPError,
    EngineTimeouts,
    PodUnreachable,
    pod_url,
)

KEY = "secret-key"


class FakePod:
    """Just enough of the server's admin API: adapters in a dict, errors in the server's shape."""

    def __init__(self) -> None:
        self.adapters: dict[str, dict[str, Any]] = {}
        self.loads: list[dict[str, Any]] = []
        self.busy = False
        self.delay_s = 0.0
        self.garbage = False

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/adapters", self._list)
        app.router.add_post("/v1/load_lora_adapter", self._load)
        app.router.add_post("/v1/unload_lora_adapter", self._unload)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path != "/health" and request.headers.get("Authorization") != f"Bearer {KEY}":
            return web.json_response(
                {"error": "missing or bad API key", "error_type": "unauthorized"}, status=401
            )
        if self.busy:
            return web.json_response(
                {"error": "queue full", "error_type": "overloaded"}, status=429, headers={"Retry-After": "2"}
            )
        await asyncio.sleep(self.delay_s)
        return await handler(request)

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def _list(self, request: web.Request) -> web.Response:
        if self.garbage:
            return web.Response(text="<html>a proxy page</html>")
        return web.json_response({"object": "list", "data": list(self.adapters.values())})

    async def _load(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.loads.append(body)
        if body["lora_path"].startswith("hf://missing"):
            return web.json_response({"error": "repository not found", "error_type": "source"}, status=422)
        info = {
            "name": body["lora_name"],
            "source": body["lora_path"],
            "state": "ready",
            "rank": 8,
            "alpha": 16.0,
            "target_modules": ["q_proj", "v_proj"],
            "aliases": body["aliases"],
            "pinned": body["pinned"],
            "load_generation": len(self.loads),
            "future_field": "ignored",
        }
        self.adapters[info["name"]] = info
        return web.json_response(info)

    async def _unload(self, request: web.Request) -> web.Response:
        name = (await request.json())["lora_name"]
        if self.adapters.pop(name, None) is None:
            return web.json_response(
                {"error": f"adapter {name!r} not found", "error_type": "adapter_not_found"}, status=404
            )
        return web.json_response({"status": "ok"})


@pytest.fixture
async def pod() -> Any:
    fake = FakePod()
    server = TestServer(fake.app(), host="127.0.0.1")
    await server.start_server()
    yield fake, pod_url("127.0.0.1", server.port)
    await server.close()


@pytest.fixture
async def client() -> Any:
    async with EngineClient(EngineTimeouts(connect_s=1, request_s=2, load_s=2), api_key=KEY) as engine:
        yield engine


async def test_load_list_unload_round_trip(pod, client) -> None:
    fake, url = pod
    assert await client.health(url) is True
    assert await client.list_adapters(url) == []
    report = await client.load_adapter(
        url, DesiredAdapter(name="sql", source="hf://org/sql", aliases=("q",), pinned=True)
    )
    assert (report.name, report.state, report.rank, report.target_modules) == (
        "sql",
        "ready",
        8,
        ("q_proj", "v_proj"),
    )
    assert fake.loads == [
        {
            "lora_name": "sql",
            "lora_path": "hf://org/sql",
            "revision": None,
            "sha256": None,
            "aliases": ["q"],
            "pinned": True,
        }
    ]
    (listed,) = await client.list_adapters(url)
    assert listed == report
    assert await client.unload_adapter(url, "sql") is True
    assert await client.unload_adapter(url, "sql") is False  # already gone counts as converged
    assert await client.list_adapters(url) == []


async def test_rejected_load_carries_the_engine_error(pod, client) -> None:
    _, url = pod
    with pytest.raises(AdapterRejected) as caught:
        await client.load_adapter(url, DesiredAdapter(name="bad", source="hf://missing/repo"))
    assert (caught.value.status, caught.value.error_type, caught.value.message) == (
        422,
        "source",
        "repository not found",
    )


async def test_busy_pod_is_not_an_error_of_the_adapter(pod, client) -> None:
    fake, url = pod
    fake.busy = True
    with pytest.raises(EngineBusy) as caught:
        await client.list_adapters(url)
    assert caught.value.retry_after_s == 2.0


async def test_wrong_key_is_an_http_error(pod) -> None:
    _, url = pod
    async with EngineClient(api_key="wrong") as engine:
        with pytest.raises(EngineHTTPError) as caught:
            await engine.list_adapters(url)
    assert (caught.value.status, caught.value.error_type) == (401, "unauthorized")
    assert not isinstance(caught.value, AdapterRejected)


async def test_slow_pod_times_out_as_unreachable(pod) -> None:
    fake, url = pod
    fake.delay_s = 1.0
    async with EngineClient(EngineTimeouts(connect_s=1, request_s=0.2), api_key=KEY) as engine:
        with pytest.raises(PodUnreachable, match="TimeoutError"):
            await engine.list_adapters(url)


async def test_closed_port_is_unreachable(client) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(PodUnreachable):
        await client.list_adapters(pod_url("127.0.0.1", port))


async def test_body_that_is_not_the_api_is_unreachable(pod, client) -> None:
    fake, url = pod
    fake.garbage = True
    with pytest.raises(PodUnreachable, match="unexpected body"):
        await client.list_adapters(url)


def test_pod_url_brackets_ipv6() -> None:
    assert pod_url("10.0.0.7", 8080) == "http://10.0.0.7:8080"
    assert pod_url("fd00::7", 8080) == "http://[fd00::7]:8080"


async def test_client_refuses_use_outside_context() -> None:
    with pytest.raises(RuntimeError):
        await EngineClient().list_adapters("http://127.0.0.1:1")
