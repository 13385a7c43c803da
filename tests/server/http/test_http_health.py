"""`/health` tells the truth (issue 15): 503 with the reason when the engine cannot serve."""

from __future__ import annotations

from typing import Any

import pytest

from loraplex.server.app import create_app
from loraplex.server.async_engine import UNHEALTHY_AFTER_FAILED_STEPS, AsyncEngine
from loraplex.server.engine import EngineConfig
from loraplex.server.request import FinishReason, GenerationRequest
from loraplex.server.sampling_params import SamplingParams


def _request(rid: str) -> GenerationRequest:
    return GenerationRequest(rid, (1, 2, 3), SamplingParams(max_new_tokens=2))


async def _final(engine: AsyncEngine, rid: str) -> Any:
    return [e async for e in engine.generate(_request(rid))][-1]


@pytest.fixture
async def engine(tiny_assets) -> Any:
    engine = AsyncEngine.from_config(EngineConfig(model_path=str(tiny_assets.models["llama"])))
    yield engine
    await engine.shutdown(timeout_s=0)


async def test_health_fails_once_the_last_steps_all_failed_and_recovers(engine, aiohttp_client) -> None:
    client = await aiohttp_client(create_app(engine))
    assert (await client.get("/health")).status == 200
    runner = engine._engine.runner
    execute = runner.execute

    def broken(batch: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    runner.execute = broken
    for i in range(UNHEALTHY_AFTER_FAILED_STEPS):
        assert (await client.get("/health")).status == 200
        assert (await _final(engine, f"bad{i}")).finish_reason is FinishReason.ERROR
    response = await client.get("/health")
    assert response.status == 503
    assert "steps all failed" in (await response.json())["reason"]
    runner.execute = execute
    assert (await _final(engine, "good")).finish_reason is FinishReason.LENGTH
    assert (await client.get("/health")).status == 200


async def test_health_fails_when_the_engine_thread_is_gone(engine, aiohttp_client) -> None:
    client = await aiohttp_client(create_app(engine))
    stream = engine.generate(
        GenerationRequest("r", (1, 2, 3), SamplingParams(max_new_tokens=500, ignore_eos=True))
    )
    await anext(stream)

    def crash() -> None:
        raise MemoryError("host memory exhausted")

    engine.adapters.trim = crash  # the loop's own bookkeeping breaks: the thread ends
    rest = [e async for e in stream]
    assert rest[-1].finish_reason is FinishReason.ERROR and "engine thread died" in rest[-1].error
    response = await client.get("/health")
    assert response.status == 503 and "MemoryError" in (await response.json())["reason"]
