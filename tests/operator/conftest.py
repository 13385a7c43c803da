"""A fake server pod speaking the adapter admin API over real HTTP, for engine_client and act tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loraplex.operator.act import Actor, BaseState, start_engine_calls
from loraplex.operator.engine_client import pod_url
from loraplex.operator.observe import ask_pods
from loraplex.operator.pods import PodObservation
from loraplex.operator.reconcile import Attempt, plan


class FakePod:
    """Just enough of the server's admin API: adapters in a dict, errors in the server's shape."""

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.url = ""
        self.port = 0
        self.server: TestServer | None = None
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
        wanted = f"Bearer {self.api_key}" if self.api_key else None
        if request.path != "/health" and request.headers.get("Authorization") != wanted:
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
        if "rank-128" in body["lora_path"]:
            error = {"error": "rank 128 exceeds max_lora_rank 64", "error_type": "rank_exceeds_max"}
            return web.json_response(error, status=422)
        if body["lora_name"] in self.adapters:
            error = {"error": f"adapter {body['lora_name']!r} already loaded", "error_type": "conflict"}
            return web.json_response(error, status=409)
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
async def start_fake_pod() -> AsyncIterator[Callable[..., Awaitable[FakePod]]]:
    """`await start_fake_pod(api_key=None)`: a running FakePod on 127.0.0.1 (stopped at teardown)."""
    servers: list[TestServer] = []

    async def start(api_key: str | None = None) -> FakePod:
        fake = FakePod(api_key)
        server = TestServer(fake.app(), host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        fake.port = server.port
        fake.server = server
        fake.url = pod_url("127.0.0.1", server.port)
        return fake

    yield start
    for server in servers:
        await server.close()


@pytest.fixture(scope="module")
def crds(local_cluster) -> None:
    """Both CRDs (no CEL: the local API server is 1.20), applied and Established (idempotent)."""
    from loraplex.localcluster.install import apply_crds

    apply_crds(local_cluster)


@dataclass(frozen=True)
class PassResult:
    pods: list[PodObservation]  # reports as the pods give them after the engine calls
    attempts: dict[tuple[str, str], Attempt]
    acted: bool


@pytest.fixture
def engine_pass() -> Callable[..., Awaitable[PassResult]]:
    """`await engine_pass(engine, desired, pod_bodies, attempts, now)`: observe the pods, plan,
    run the engine calls to the end, observe again (a base's loop without Kubernetes writes)."""

    async def run(engine, desired, bodies, attempts=None, now=0.0) -> PassResult:
        pods = await ask_pods(engine, bodies, 8)
        actions = plan(desired, pods, attempts or {}, now)
        state = BaseState(attempts=dict(attempts or {}))
        actor = Actor(kube=None, engine=engine, state=state, wake=lambda: None, clock=lambda: now)
        await asyncio.gather(*start_engine_calls(actor, actions, pods))
        return PassResult(await ask_pods(engine, bodies, 8), state.attempts, any(actions.values()))

    return run
