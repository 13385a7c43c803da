"""The adapter manager end to end on the tiny Llama: tiers, churn, hot load/reload/unload, refusals.

Every request's tokens are compared with transformers + peft running the same adapter directory.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest
import torch
from adapter_cases import BAD_ADAPTERS, hub_cache, traversal_tarball
from aiohttp import web
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.server.async_engine import AsyncEngine
from loraplex.server.demo_assets import AdapterRecipe, build_adapter
from loraplex.server.engine import EngineConfig
from loraplex.server.engine_api import AdapterLoadError, LoadAdapterSpec, UnknownAdapterError
from loraplex.server.request import FinishReason, GenerationRequest
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.scheduler import ScheduledStep

PROMPTS = ((5, 17, 42, 99, 7, 300, 12), (9, 8, 7, 250, 31))
_REFERENCE: dict[tuple, list[int]] = {}


def reference(model_dir: Path, adapter_dir: Path | None, prompt: tuple[int, ...], num_new: int) -> list[int]:
    """Greedy tokens from transformers (+ peft), independent of the engine."""
    key = (model_dir, adapter_dir, prompt, num_new)
    if key not in _REFERENCE:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.generation_config.eos_token_id = None
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, adapter_dir)
        with torch.no_grad():
            out = model.generate(
                input_ids=torch.tensor([prompt]), max_new_tokens=num_new, do_sample=False, pad_token_id=0
            )
        _REFERENCE[key] = out[0, len(prompt) :].tolist()
    return _REFERENCE[key]


def make_engine(assets, specs: tuple[LoadAdapterSpec, ...], **overrides: Any) -> AsyncEngine:
    settings: dict[str, Any] = {
        "max_loras": 2,
        "max_lora_rank": 16,
        "block_size": 4,
        "num_kv_blocks": 256,
        "max_input_tokens": 64,
        "max_total_tokens": 256,
        "adapters": specs,
        "adapter_cache_dir": str(assets.root.parent / "adapter-cache"),
    }
    return AsyncEngine.from_config(
        EngineConfig(model_path=str(assets.models["llama"]), **(settings | overrides))
    )


def req(rid: str, prompt: tuple[int, ...], adapter: str | None, num_new: int) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_new_tokens=num_new, ignore_eos=True), adapter)


async def tokens(engine: AsyncEngine, request: GenerationRequest) -> list[int]:
    return [e.token_id async for e in engine.generate(request) if e.token_id is not None]


class StepLog:
    """The adapters of every step, recorded from the scheduler's own plan."""

    def __init__(self) -> None:
        self.steps: list[set[str]] = []
        self.slots: list[set[int]] = []

    def __call__(self, step: ScheduledStep) -> None:
        self.steps.append({seq.adapter_name for seq, _ in step.chunks if seq.adapter_name})
        self.slots.append({seq.lora_slot for seq, _ in step.chunks if seq.lora_slot is not None})


@pytest.fixture(scope="module")
def ten_adapters(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """Ten PEFT adapters for the tiny Llama, different seeds and ranks."""
    root = tmp_path_factory.mktemp("ten-adapters")
    targets = ("q_proj", "v_proj", "down_proj")
    recipes = [AdapterRecipe(f"s{i}", (4, 8)[i % 2], 8, targets, seed=100 + i) for i in range(10)]
    model = tiny_assets.models["llama"]
    return {r.name: build_adapter(model, r, root / r.name, base_name="tiny-llama") for r in recipes}


@pytest.fixture
async def engine(tiny_assets) -> AsyncIterator[AsyncEngine]:
    paths = tiny_assets.adapters["llama"]
    engine = make_engine(
        tiny_assets, (LoadAdapterSpec("a4", str(paths["a4"])), LoadAdapterSpec("b8", str(paths["b8"])))
    )
    yield engine
    await engine.shutdown(timeout_s=0)


async def test_fifty_requests_over_ten_adapters_and_two_slots(tiny_assets, ten_adapters) -> None:
    specs = tuple(LoadAdapterSpec(name, str(path)) for name, path in ten_adapters.items())
    engine = make_engine(tiny_assets, specs, max_cpu_loras=3)  # most adapters live on disk only
    log = StepLog()
    engine.observe_steps(log)
    assert {a.tier for a in engine.list_adapters()} == {"cpu", "disk"}
    names = list(ten_adapters)
    requests = [req(f"r{i}", PROMPTS[(i // 10) % 2], names[i % 10], 6) for i in range(50)]
    results = await asyncio.gather(*(tokens(engine, r) for r in requests))
    stats = engine.stats()
    await engine.shutdown(timeout_s=0)
    model = tiny_assets.models["llama"]
    for request, got in zip(requests, results, strict=True):
        expected = reference(model, ten_adapters[request.adapter], request.prompt_token_ids, 6)
        assert got == expected, request.request_id
    assert max(len(s) for s in log.steps) == 2 and max(len(s) for s in log.slots) == 2  # never more
    assert set().union(*log.steps) == set(names)
    extra = stats.extra
    assert extra["adapter_disk_reads"] > 0 and extra["adapter_host_evictions"] > 0
    assert extra["adapter_slot_evictions"] > 0 and extra["adapter_host_count"] <= 3
    assert sum(engine.get_adapter(n).requests_served for n in names) == 50


async def test_load_reload_unload_while_others_decode(tiny_assets) -> None:
    paths, model = tiny_assets.adapters["llama"], tiny_assets.models["llama"]
    specs = (LoadAdapterSpec("a4", str(paths["a4"])), LoadAdapterSpec("b8", str(paths["b8"])))
    engine = make_engine(tiny_assets, specs, max_loras=3)  # room for "extra" next to both
    log = StepLog()
    engine.observe_steps(log)
    background = [
        req("bg-base", PROMPTS[0], None, 200),
        req("bg-a4", PROMPTS[1], "a4", 200),
        req("bg-b8", PROMPTS[0], "b8", 200),
    ]
    streams = [engine.generate(r) for r in background]
    firsts = [await anext(s) for s in streams]  # all three are decoding now
    rests = [asyncio.create_task(_drain(s)) for s in streams]
    host_before = engine.stats().extra["adapter_host_bytes"]

    first = await engine.load_adapter(LoadAdapterSpec("extra", f"file://{paths['c16']}"))
    assert await engine.load_adapter(LoadAdapterSpec("extra", f"file://{paths['c16']}")) == first  # no-op
    assert await tokens(engine, req("x1", PROMPTS[1], "extra", 8)) == reference(
        model, paths["c16"], PROMPTS[1], 8
    )
    second = await engine.load_adapter(LoadAdapterSpec("extra", str(paths["a4"])))
    assert second.load_generation > first.load_generation and second.rank == 4
    # same prompt again: KV cached for the old weights must not be reused (prefix cache keyed by generation)
    assert await tokens(engine, req("x2", PROMPTS[1], "extra", 8)) == reference(
        model, paths["a4"], PROMPTS[1], 8
    )
    assert engine.stats().extra["adapter_loads"] == 4  # a4, b8, extra twice; the no-op did not count

    await engine.unload_adapter("b8")  # waits for bg-b8, which keeps its own adapter to the end
    assert rests[2].done()
    await engine.unload_adapter("extra")
    with pytest.raises(UnknownAdapterError):
        engine.generate(req("gone", PROMPTS[0], "extra", 2))
    for request, head, rest in zip(background, firsts, rests, strict=True):
        adapter = paths[request.adapter] if request.adapter else None
        got = [head.token_id, *await rest]
        assert got == reference(model, adapter, request.prompt_token_ids, 200), request.request_id
    assert engine.stats().extra["adapter_host_bytes"] == host_before - engine_bytes(tiny_assets, "b8")
    assert any({"a4", "b8", "extra"} <= s for s in log.steps)  # "extra" ran while the others decoded
    await engine.shutdown(timeout_s=0)


def engine_bytes(assets, name: str) -> int:
    from transformers import AutoConfig

    from loraplex.server.async_engine import load_local_adapter

    config = AutoConfig.from_pretrained(assets.models["llama"])
    return load_local_adapter(
        LoadAdapterSpec(name, str(assets.adapters["llama"][name])), config, 16
    ).num_bytes


async def _drain(stream) -> list[int]:
    return [e.token_id async for e in stream if e.token_id is not None]


async def test_bad_adapters_are_refused_while_serving(
    engine, tiny_assets, tmp_path, aiohttp_server, monkeypatch
) -> None:
    paths, model = tiny_assets.adapters["llama"], tiny_assets.models["llama"]
    running = asyncio.create_task(tokens(engine, req("serving", PROMPTS[0], "a4", 120)))
    www = tmp_path / "www"
    www.mkdir()
    (www / "evil.tar.gz").write_bytes(traversal_tarball(paths["a4"]))
    app = web.Application()
    app.router.add_static("/", www)
    server = await aiohttp_server(app)
    cases = {
        name: (build(paths["c16"], tmp_path / name), error_type, fragment)
        for name, (build, error_type, fragment) in BAD_ADAPTERS.items()
    }
    cases["traversal"] = (str(server.make_url("/evil.tar.gz")), "validation", "unsafe path")
    messages = set()
    for name, (source, error_type, fragment) in cases.items():
        with pytest.raises(AdapterLoadError, match=fragment) as info:
            await engine.load_adapter(LoadAdapterSpec(name, str(source)))
        assert info.value.error_type == error_type, name
        failed = engine.get_adapter(name)
        assert (failed.state, failed.error_type) == ("failed", error_type)
        messages.add(str(info.value))
    assert len(messages) == len(cases)
    # the hub layout loads, and serves, while everything above was refused
    hub = tmp_path / "hub"
    hub_cache(hub, "team/sql-lora", paths["b8"])
    monkeypatch.setenv("LORAPLEX_HF_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    info = await engine.load_adapter(LoadAdapterSpec("sql", "hf://team/sql-lora", revision="main"))
    assert (info.state, info.rank, info.revision) == ("ready", 8, "main")
    assert await tokens(engine, req("sql", PROMPTS[1], "sql", 8)) == reference(
        model, paths["b8"], PROMPTS[1], 8
    )
    assert await running == reference(model, paths["a4"], PROMPTS[0], 120)


async def test_status_fields(engine, tiny_assets) -> None:
    info = engine.get_adapter("b8")
    assert (info.state, info.rank, info.alpha) == ("ready", 8, 16.0)
    assert info.target_modules and info.size_bytes and info.loaded_at and info.source.endswith("b8")
    assert info.tier == "cpu" and info.requests_served == 0
    await tokens(engine, req("one", PROMPTS[0], "b8", 2))
    info = engine.get_adapter("b8")
    assert info.tier == "gpu" and info.requests_served == 1


async def test_disk_tier_request_can_be_aborted_and_pinned_stays_in_memory(tiny_assets) -> None:
    paths, model = tiny_assets.adapters["llama"], tiny_assets.models["llama"]
    specs = (
        LoadAdapterSpec("pin", str(paths["c16"]), pinned=True),
        LoadAdapterSpec("a4", str(paths["a4"])),
        LoadAdapterSpec("b8", str(paths["b8"])),
    )
    engine = make_engine(tiny_assets, specs, max_cpu_loras=1)
    assert [engine.get_adapter(n).tier for n in ("pin", "a4", "b8")] == ["cpu", "disk", "cpu"]
    stream = engine.generate(req("gone", PROMPTS[0], "a4", 4))
    await engine.abort("gone")
    events = [e async for e in stream]
    assert events[-1].finish_reason is FinishReason.CANCELLED
    assert await tokens(engine, req("back", PROMPTS[0], "a4", 6)) == reference(
        model, paths["a4"], PROMPTS[0], 6
    )
    assert engine.get_adapter("pin").tier == "cpu" and engine.get_adapter("b8").tier == "disk"
    assert engine.stats().extra["adapter_disk_reads"] >= 1
    await engine.shutdown(timeout_s=0)
