"""Contract: the operator's engine client and one pass of engine calls against the real server app
(tiny CPU Llama, real adapter loads), not a fake. The operator code itself imports no server code."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterRejected, EngineClient, EngineHTTPError, pod_url
from loraplex.operator.lora import LoraAdapterStatus, LoraPhase
from loraplex.operator.status import lora_status
from loraplex.server.app import create_app
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.demo_assets import TinyAssets
from loraplex.server.engine import EngineConfig
from loraplex.server.routes.context import ServerSettings

KEY = "contract-key"


def _pod_body(port: int) -> dict[str, Any]:
    """A running pod object whose server listens on 127.0.0.1:port."""
    running = {"name": "server", "restartCount": 0, "state": {"running": {"startedAt": "t"}}}
    return {
        "metadata": {"name": "pod-a"},
        "spec": {"containers": [{"name": "server", "ports": [{"name": "http", "containerPort": port}]}]},
        "status": {"podIP": "127.0.0.1", "containerStatuses": [running]},
    }


@pytest.fixture
async def server(tiny_assets: TinyAssets) -> AsyncIterator[tuple[str, int, dict[str, Any]]]:
    # Rank limit 8: the tiny `c16` adapter (rank 16) must be refused with the engine's reason.
    engine = AsyncEngine.from_config(
        EngineConfig(model_path=str(tiny_assets.models["llama"]), max_lora_rank=8)
    )
    app = create_app(engine, ServerSettings(api_key=KEY))
    test_server = TestServer(app, host="127.0.0.1")
    await test_server.start_server()
    try:
        yield pod_url("127.0.0.1", test_server.port), test_server.port, tiny_assets.adapters["llama"]
    finally:
        await test_server.close()
        await engine.shutdown(timeout_s=2.0)


async def test_client_speaks_the_real_admin_api(server) -> None:
    url, _, dirs = server
    async with EngineClient(api_key=KEY) as engine:
        assert await engine.health(url)
        assert await engine.list_adapters(url) == []
        report = await engine.load_adapter(
            url, DesiredAdapter(name="sql", source=f"file://{dirs['a4']}", aliases=("q",))
        )
        assert (report.name, report.state, report.rank, report.aliases) == ("sql", "ready", 4, ("q",))
        (listed,) = await engine.list_adapters(url)
        assert listed.name == "sql" and listed.state == "ready" and listed.target_modules
        with pytest.raises(AdapterRejected) as refused:
            await engine.load_adapter(url, DesiredAdapter(name="big", source=str(dirs["c16"])))
        # The operator keys on the engine's error type and text, not on the status code.
        assert (
            refused.value.error_type in {"validation", "rank_exceeds_max"} and "16" in refused.value.message
        )
        with pytest.raises(AdapterRejected) as missing:
            await engine.load_adapter(url, DesiredAdapter(name="gone", source="/nonexistent/adapter"))
        assert missing.value.error_type != "unknown"
        assert await engine.unload_adapter(url, "sql") is True
        assert await engine.unload_adapter(url, "sql") is False
    async with EngineClient(api_key="wrong") as engine:
        with pytest.raises(EngineHTTPError) as denied:
            await engine.list_adapters(url)
        assert denied.value.status == 401


async def test_a_pass_converges_a_real_pod(server, engine_pass) -> None:
    url, port, dirs = server
    body = _pod_body(port)
    desired = {
        "a": DesiredAdapter(name="a", source=str(dirs["a4"])),
        "b": DesiredAdapter(name="b", source=str(dirs["b8"]), pinned=True),
        "big": DesiredAdapter(name="big", source=str(dirs["c16"])),
    }
    async with EngineClient(api_key=KEY) as engine:
        first = await engine_pass(engine, desired, [body], {}, now=1000.0)
        states = {report.name: report.state for report in first.pods[0].reports}
        assert states["a"] == states["b"] == "ready"
        assert ("pod-a", "big") in first.attempts  # refused: backing off, the others serve
        second = await engine_pass(engine, desired, [body], first.attempts, now=1001.0)
        assert not second.acted  # converged; the refusal is not retried before its backoff
        names = {report.name for report in await engine.list_adapters(url) if report.state == "ready"}
        assert names == {"a", "b"}


async def test_refusal_reaches_status_with_the_engines_text(server, engine_pass) -> None:
    _, port, dirs = server
    body = _pod_body(port)
    big = DesiredAdapter(name="big", source=str(dirs["c16"]))
    async with EngineClient(api_key=KEY) as engine:
        result = await engine_pass(engine, {"big": big}, [body], {}, now=1000.0)
    attempts = {pod: a for (pod, name), a in result.attempts.items() if name == "big"}
    status = lora_status(big, 1, result.pods, attempts, LoraAdapterStatus(), now=1000.0)
    assert status.phase == LoraPhase.FAILED
    (failure,) = [c for c in status.conditions if c.type not in {"Loaded", "Ready"}]
    assert "rank" in failure.message and "16" in failure.message and failure.message.endswith("(pods: pod-a)")


async def test_listing_by_deltas_equals_a_whole_list(server, monkeypatch: pytest.MonkeyPatch) -> None:
    """After its first list the client asks only for changes (`?since=`): the view it keeps of the
    pod equals what a fresh client's whole list says, through loads, tokens and unloads; a pod
    that restarted (another instance) answers with its whole list."""
    url, _, dirs = server
    asked: list[tuple[int, str]] = []
    real_request = EngineClient._request

    async def recording(self, method, target, *args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append((id(self), target))
        return await real_request(self, method, target, *args, **kwargs)

    monkeypatch.setattr(EngineClient, "_request", recording)

    async def whole() -> dict[str, Any]:
        async with EngineClient(api_key=KEY) as fresh:
            return {report.name: report for report in await fresh.list_adapters(url)}

    async with EngineClient(api_key=KEY) as engine:
        assert await engine.list_adapters(url) == []
        for name, source in (("a", dirs["a4"]), ("b", dirs["b8"])):
            await engine.load_adapter(url, DesiredAdapter(name=name, source=str(source)))
        listed = {report.name: report for report in await engine.list_adapters(url)}
        assert listed == await whole() and set(listed) == {"a", "b"}
        assert await engine.unload_adapter(url, "a") is True
        listed = {report.name: report for report in await engine.list_adapters(url)}
        assert listed == await whole() and set(listed) == {"b"}
        mine = [t for who, t in asked if who == id(engine) and t.startswith(f"{url}/v1/adapters")]
        assert len(mine) == 3 and "?since=" not in mine[0] and all("?since=" in t for t in mine[1:])
        kept = engine._listings[url]
        kept.instance = "a-process-before-a-restart"
        assert {report.name for report in await engine.list_adapters(url)} == {"b"}
        assert engine._listings[url].instance != "a-process-before-a-restart"
