"""Drain within the grace period (issue 15): SIGTERM's sequence as `serve` runs it, timed.

Streams still running at the deadline end with a final error event `error_type: "shutdown"`
instead of a cut connection, and the whole drain takes delay + timeout + at most two short
handler waits (aiohttp used to wait the full shutdown timeout twice).
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from aiohttp import web

from loraplex.server.app import create_app
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.engine import EngineConfig
from loraplex.server.routes.health import DRAIN
from loraplex.server.serve_cli import FINAL_WRITE_TIMEOUT_S, drain

DELAY_S, TIMEOUT_S = 0.3, 1.0


async def _last_event(session: aiohttp.ClientSession, url: str, body: dict, first: asyncio.Event) -> dict:
    async with session.post(url, json=body) as response:
        assert response.status == 200
        last: dict = {}
        async for line in response.content:
            if line.startswith(b"data:") and not line.startswith(b"data: [DONE]"):
                last = json.loads(line[5:])
                first.set()
        return last


async def test_drain_ends_long_streams_with_a_shutdown_event_within_budget(tiny_assets) -> None:
    engine = AsyncEngine.from_config(
        EngineConfig(model_path=str(tiny_assets.models["llama"]), max_total_tokens=4096, max_input_tokens=64)
    )
    app = create_app(engine)
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=FINAL_WRITE_TIMEOUT_S)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    url = f"http://{host}:{port}"
    long_tgi = {"inputs": "the model", "parameters": {"max_new_tokens": 4000}}
    long_oai = {
        "model": engine.model_name,
        "prompt": "the model",
        "max_tokens": 4000,
        "ignore_eos": True,
        "stream": True,
    }
    async with aiohttp.ClientSession() as session:
        firsts = [asyncio.Event(), asyncio.Event()]
        streams = [
            asyncio.create_task(
                _last_event(
                    session,
                    f"{url}/generate_stream",
                    {**long_tgi, "parameters": {**long_tgi["parameters"], "stop": []}},
                    firsts[0],
                )
            ),
            asyncio.create_task(_last_event(session, f"{url}/v1/completions", long_oai, firsts[1])),
        ]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in firsts)), 30)
        started = time.perf_counter()
        draining = asyncio.create_task(drain(app, runner, engine, DELAY_S, TIMEOUT_S))
        await asyncio.sleep(DELAY_S / 3)
        assert app[DRAIN].draining
        async with session.get(f"{url}/ready") as ready:
            assert ready.status == 503
        async with session.post(
            f"{url}/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 2}}
        ) as short:
            assert short.status == 200  # still served during the delay
        await draining
        elapsed = time.perf_counter() - started
        tgi_last, oai_last = await asyncio.gather(*streams)
    assert tgi_last["error_type"] == "shutdown", tgi_last
    assert oai_last["error"]["code"] == "shutdown", oai_last
    assert DELAY_S + TIMEOUT_S <= elapsed < DELAY_S + TIMEOUT_S + 2 * FINAL_WRITE_TIMEOUT_S + 1.0, elapsed
