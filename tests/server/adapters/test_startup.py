"""The adapters file: read at start, then re-applied when its content changes (ConfigMap symlink swap)."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest

from loraplex.server.adapters.startup import AdaptersFileWatcher, parse_adapters_document, parse_lora_adapters
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.engine import EngineConfig
from loraplex.server.engine_api import LoadAdapterSpec


def publish(mount: Path, entries: list[dict], version: int) -> None:
    """Write the file the way the kubelet updates a ConfigMap volume: new dir, then swap `..data`."""
    data = mount / f"..v{version}"
    data.mkdir()
    (data / "adapters.json").write_text(json.dumps(entries))
    tmp_link = mount / "..data_tmp"
    tmp_link.symlink_to(data.name)
    os.replace(tmp_link, mount / "..data")
    if not (mount / "adapters.json").is_symlink():
        (mount / "adapters.json").symlink_to("..data/adapters.json")


@pytest.fixture
async def engine(tiny_assets):
    config = EngineConfig(
        model_path=str(tiny_assets.models["llama"]), max_loras=2, max_lora_rank=16, num_kv_blocks=64
    )
    engine = AsyncEngine.from_config(config)
    yield engine
    await engine.shutdown(timeout_s=0)


async def test_file_changes_load_and_unload(engine, tiny_assets, tmp_path) -> None:
    paths = {name: str(path) for name, path in tiny_assets.adapters["llama"].items()}
    mount = tmp_path / "config"
    mount.mkdir()
    publish(mount, [{"name": "a4", "source": paths["a4"]}, {"name": "b8", "source": paths["b8"]}], 1)
    watcher = AdaptersFileWatcher(mount / "adapters.json", poll_s=0.05)
    for spec in watcher.read_initial():  # the startup path loads these
        await engine.load_adapter(spec)
    await engine.load_adapter(LoadAdapterSpec("api", paths["c16"]))  # not the file's: left alone
    assert not await watcher.check(engine)  # unchanged

    publish(
        mount,
        [{"name": "b8", "source": paths["c16"], "pinned": True}, {"name": "new", "uri": paths["a4"]}],
        2,
    )
    generation = engine.get_adapter("b8").load_generation
    assert await watcher.check(engine)
    listed = {a.name: a for a in engine.list_adapters()}
    assert set(listed) == {"b8", "new", "api"}
    assert listed["b8"].rank == 16 and listed["b8"].pinned and listed["b8"].load_generation > generation

    (mount / "..data" / "adapters.json").write_text("[{not valid")  # a bad edit keeps the last good list
    assert not await watcher.check(engine)
    assert {a.name for a in engine.list_adapters()} == {"b8", "new", "api"}


async def test_the_watch_loop_picks_up_a_change(engine, tiny_assets, tmp_path) -> None:
    path = tmp_path / "adapters.yaml"
    path.write_text("[]")
    watcher = AdaptersFileWatcher(path, poll_s=0.02)
    watcher.read_initial()
    task = asyncio.create_task(watcher.run(engine))
    path.write_text(f"adapters:\n  - name: late\n    source: {tiny_assets.adapters['llama']['a4']}\n")
    for _ in range(500):
        if any(a.name == "late" and a.state == "ready" for a in engine.list_adapters()):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    assert engine.get_adapter("late").state == "ready"


def test_parsing() -> None:
    assert parse_lora_adapters("org/a@v1, b=hf://org/b@r") == (
        LoadAdapterSpec("org/a", "org/a", revision="v1"),
        LoadAdapterSpec("b", "hf://org/b@r"),
    )
    with pytest.raises(ValueError, match="name"):
        parse_adapters_document('[{"source": "/x"}]', "f")
    with pytest.raises(ValueError, match="list"):
        parse_adapters_document('{"adapters": "x"}', "f")


def test_cli_flags_reach_the_engine_config(monkeypatch) -> None:
    import argparse
    import dataclasses

    from loraplex.server import serve_cli

    monkeypatch.setenv("STRICT_BASE_MODEL", "true")
    parser = argparse.ArgumentParser()
    serve_cli.add_arguments(parser)
    args = parser.parse_args(
        ["--max-cpu-loras", "3", "--max-cpu-lora-bytes", "1000", "--max-adapter-bytes", "99"]
    )
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    config = EngineConfig(model_path="m", **serve_cli.engine_config_kwargs(args, known))
    assert (config.max_cpu_loras, config.max_cpu_lora_bytes, config.max_adapter_bytes) == (3, 1000, 99)
    assert config.strict_base_model and config.adapter_loader_config().strict_base_model
