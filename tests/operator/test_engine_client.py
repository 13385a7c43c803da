"""EngineClient against a small real aiohttp server speaking the admin API (DESIGN.md §4)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

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


@pytest.fixture
async def pod(start_fake_pod) -> Any:
    fake = await start_fake_pod(api_key=KEY)
    return fake, fake.url


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
            "open": False,
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
