"""AsyncEngine: the Engine Protocol over the engine thread, on the tiny Llama."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.server.async_engine import AsyncEngine
from loraplex.server.engine import EngineConfig
from loraplex.server.engine_api import (
    AdapterLoadError,
    Engine,
    InvalidRequestError,
    LoadAdapterSpec,
    QueueFullError,
    ShuttingDownError,
    UnknownAdapterError,
)
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sampling_params import SamplingParams

PROMPTS = ((5, 17, 42, 99, 7, 300, 12), (9, 8, 7), (100, 101, 102, 103, 104, 105, 106, 107, 108, 109, 110))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def config(assets, **overrides: Any) -> EngineConfig:
    adapters = tuple(LoadAdapterSpec(n, str(p)) for n, p in assets.adapters["llama"].items())
    settings: dict[str, Any] = {
        "max_loras": 2,
        "max_lora_rank": 16,
        "block_size": 4,
        "num_kv_blocks": 128,
        "max_input_tokens": 64,
        "max_total_tokens": 256,
        "adapters": adapters,
        "served_model_name": "tiny",
    }
    return EngineConfig(model_path=str(assets.models["llama"]), **(settings | overrides))


@pytest.fixture
async def engine(tiny_assets) -> AsyncIterator[AsyncEngine]:
    engine = AsyncEngine.from_config(config(tiny_assets))
    yield engine
    await engine.shutdown(timeout_s=0)


def req(rid: str, prompt: tuple[int, ...], adapter: str | None = None, **params: Any) -> GenerationRequest:
    return GenerationRequest(
        rid, prompt, SamplingParams(**({"max_new_tokens": 24, "ignore_eos": True} | params)), adapter
    )


async def collect(engine: AsyncEngine, request: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in engine.generate(request)]


_REFERENCE: dict[tuple, list[int]] = {}


def peft_tokens(assets, adapter: str | None, prompt: tuple[int, ...], num_new: int) -> list[int]:
    """Greedy tokens from transformers (+ peft for an adapter), independent of the engine."""
    key = (adapter, prompt, num_new)
    if key not in _REFERENCE:
        model = AutoModelForCausalLM.from_pretrained(assets.models["llama"], dtype=torch.float32)
        model.generation_config.eos_token_id = None
        if adapter is not None:
            model = PeftModel.from_pretrained(model, assets.adapters["llama"][adapter])
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False, pad_token_id=0
            )
        _REFERENCE[key] = out[0, len(prompt) :].tolist()
    return _REFERENCE[key]


def sync_tokens(assets, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    return {
        r.request_id: peft_tokens(assets, r.adapter, r.prompt_token_ids, r.params.max_new_tokens)
        for r in requests
    }


async def test_implements_the_engine_protocol(engine) -> None:
    typed: Engine = engine
    assert typed.model_name == "tiny" and typed.max_input_tokens == 64 and typed.max_total_tokens == 256
    assert typed.tokenizer.decode([5, 17]) != ""
    assert {a.name for a in typed.list_adapters()} == {"a4", "b8", "c16"}
    assert all(a.state == "ready" and a.load_generation > 0 for a in typed.list_adapters())


async def test_concurrent_streams_match_sequential_runs(engine, tiny_assets) -> None:
    requests = [req(f"r{i}", PROMPTS[i % 3], (None, "a4", "b8", "c16")[i % 4]) for i in range(6)]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    expected = sync_tokens(tiny_assets, requests)  # transformers + peft
    for request, events in zip(requests, results, strict=True):
        assert [e.token_id for e in events] == expected[request.request_id]
        assert events[-1].finish_reason is FinishReason.LENGTH and events[-1].num_generated_tokens == 24
        assert all(e.finish_reason is None for e in events[:-1])
    assert engine.get_adapter("a4").requests_served >= 1


async def test_closing_the_stream_cancels_and_frees_blocks(engine) -> None:
    stream = engine.generate(req("long", PROMPTS[2], "b8", max_new_tokens=200))
    async for event in stream:
        if event.num_generated_tokens >= 3:
            break
    await stream.aclose()  # type: ignore[attr-defined]
    for _ in range(200):
        stats = engine.stats()
        if stats.num_running == 0 and stats.kv_cache_usage == 0.0:
            break
        await asyncio.sleep(0.01)
    assert stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0


async def test_abort_ends_the_stream_with_cancelled(engine) -> None:
    stream = engine.generate(req("a", PROMPTS[0], max_new_tokens=200))
    first = await anext(stream)
    await engine.abort("a")
    rest = [e async for e in stream]
    assert first.finish_reason is None and rest[-1].finish_reason is FinishReason.CANCELLED


async def test_admission_errors_are_typed(engine) -> None:
    with pytest.raises(InvalidRequestError):
        engine.generate(req("long", tuple(range(65))))
    with pytest.raises(InvalidRequestError):
        engine.generate(req("total", PROMPTS[0], max_new_tokens=250))
    with pytest.raises(InvalidRequestError):
        engine.generate(req("vocab", (10**6,)))
    with pytest.raises(UnknownAdapterError):
        engine.generate(req("x", PROMPTS[0], "nope"))  # never the base model instead


async def test_queue_full(tiny_assets) -> None:
    engine = AsyncEngine.from_config(config(tiny_assets, max_concurrent_requests=2, adapters=()))
    streams = [engine.generate(req("r0", PROMPTS[0], max_new_tokens=100))]
    with pytest.raises(InvalidRequestError):
        engine.generate(req("r0", PROMPTS[0]))  # duplicate ids are refused
    streams.append(engine.generate(req("r1", PROMPTS[0], max_new_tokens=100)))
    with pytest.raises(QueueFullError) as info:
        engine.generate(req("third", PROMPTS[0]))
    assert info.value.retry_after_s > 0
    for stream in streams:
        await stream.aclose()  # type: ignore[attr-defined]
    await engine.shutdown(timeout_s=0)


async def test_load_use_unload_and_reload(engine, tiny_assets) -> None:
    path = str(tiny_assets.adapters["llama"]["c16"])
    info = await engine.load_adapter(LoadAdapterSpec("extra", f"file://{path}", aliases=("extra-alias",)))
    assert info.state == "ready" and info.rank == 16 and info.size_bytes and info.size_bytes > 0
    assert (
        await engine.load_adapter(LoadAdapterSpec("extra", f"file://{path}", aliases=("extra-alias",)))
        == info
    )
    via_alias = await collect(engine, req("x", PROMPTS[1], "extra-alias"))
    via_c16 = await collect(engine, req("y", PROMPTS[1], "c16"))
    assert [e.token_id for e in via_alias] == [e.token_id for e in via_c16]
    reloaded = await engine.load_adapter(LoadAdapterSpec("extra", str(tiny_assets.adapters["llama"]["a4"])))
    assert reloaded.load_generation > info.load_generation and reloaded.rank == 4
    await engine.unload_adapter("extra")
    with pytest.raises(UnknownAdapterError):
        engine.get_adapter("extra")
    with pytest.raises(UnknownAdapterError):
        engine.generate(req("z", PROMPTS[1], "extra"))
    with pytest.raises(UnknownAdapterError):
        await engine.unload_adapter("extra")


async def test_unload_waits_for_requests_in_flight(engine, tiny_assets) -> None:
    expected = sync_tokens(tiny_assets, [req("w", PROMPTS[0], "b8")])["w"]
    stream = engine.generate(req("w", PROMPTS[0], "b8"))
    first = await anext(stream)
    unload = asyncio.create_task(engine.unload_adapter("b8"))
    events = [first] + [e async for e in stream]
    await unload
    assert [e.token_id for e in events] == expected
    assert "b8" not in {a.name for a in engine.list_adapters()}


async def test_bad_adapters_are_refused_with_their_reason(engine, tiny_assets, tmp_path) -> None:
    with pytest.raises(AdapterLoadError) as missing:
        await engine.load_adapter(LoadAdapterSpec("ghost", str(tmp_path / "missing")))
    assert missing.value.error_type == "adapter_not_found"
    big = tmp_path / "big"
    shutil.copytree(tiny_assets.adapters["llama"]["c16"], big)
    config = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**config, "r": 64}))
    with pytest.raises(AdapterLoadError) as too_big:
        await engine.load_adapter(LoadAdapterSpec("big", str(big)))
    assert too_big.value.error_type == "rank_exceeds_max" and "rank" in str(too_big.value)
    assert engine.get_adapter("big").state == "failed"
    with pytest.raises(UnknownAdapterError):
        engine.generate(req("b", PROMPTS[0], "big"))
    assert len(await collect(engine, req("ok", PROMPTS[0], max_new_tokens=2))) == 2  # still serving


async def test_shutdown_refuses_new_work_and_cancels_the_rest(tiny_assets) -> None:
    engine = AsyncEngine.from_config(config(tiny_assets, adapters=()))
    stream = engine.generate(req("s", PROMPTS[0], max_new_tokens=200))
    await anext(stream)
    await engine.shutdown(timeout_s=0.05)
    rest = [e async for e in stream]
    assert rest[-1].finish_reason is FinishReason.CANCELLED
    with pytest.raises(ShuttingDownError):
        engine.generate(req("t", PROMPTS[0]))


async def test_slot_churn_many_adapters_two_slots(tiny_assets) -> None:
    """Nine served adapters over two slots: every request still gets its own adapter's tokens."""
    paths = tiny_assets.adapters["llama"]
    specs = tuple(LoadAdapterSpec(f"{base}-{i}", str(paths[base])) for i in range(3) for base in paths)
    engine = AsyncEngine.from_config(config(tiny_assets, adapters=specs))
    requests = [req(f"r{i}", PROMPTS[i % 3], specs[i % len(specs)].name, max_new_tokens=8) for i in range(27)]
    results = await asyncio.gather(*(collect(engine, r) for r in requests))
    await engine.shutdown(timeout_s=0)
    underlying = [req(f"{p}-{n}", PROMPTS[n], p, max_new_tokens=8) for p in paths for n in range(3)]
    expected = sync_tokens(tiny_assets, underlying)
    for request, events in zip(requests, results, strict=True):
        base = request.adapter.rsplit("-", 1)[0]  # type: ignore[union-attr]
        prompt_index = PROMPTS.index(request.prompt_token_ids)
        assert [e.token_id for e in events] == expected[f"{base}-{prompt_index}"], request.request_id
