"""The server's own adapter copies (issue 15): what is served under a load_generation never
changes when the user's files change or disappear; abandoned staging dirs are swept at start."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import huggingface_hub.constants
from adapter_cases import hub_cache

from loraplex.server.adapters.loader import LoaderConfig, SourceLoader
from loraplex.server.adapters.owned_store import STAGING_PREFIX, new_staging, own_copy, release_staging
from loraplex.server.async_engine import AsyncEngine
from loraplex.server.engine import EngineConfig
from loraplex.server.engine_api import LoadAdapterSpec
from loraplex.server.request import GenerationRequest
from loraplex.server.sampling_params import SamplingParams

PROMPT = (5, 17, 42, 99, 7, 300, 12)
WEIGHTS = "adapter_model.safetensors"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_own_copy_is_a_copy_keyed_by_digest(tiny_assets, tmp_path: Path) -> None:
    user = tmp_path / "user"
    shutil.copytree(tiny_assets.adapters["llama"]["a4"], user)
    owned = own_copy(user, tmp_path / "cache")
    assert owned.sha256 == _sha(user / WEIGHTS) and owned.directory.name.startswith(owned.sha256)
    assert os.stat(owned.directory / WEIGHTS).st_ino != os.stat(user / WEIGHTS).st_ino  # user files: copied
    assert own_copy(user, tmp_path / "cache").directory == owned.directory  # the same files: reused
    assert not list((tmp_path / "cache").rglob(f"{STAGING_PREFIX}*"))


def test_abandoned_staging_dirs_are_swept_when_the_loader_starts(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    dead = cache / f"{STAGING_PREFIX}999999999-abc"  # a pid that does not exist
    owned_dead = cache / "owned" / f"{STAGING_PREFIX}999999998-x"
    ours_left = cache / f"{STAGING_PREFIX}{os.getpid()}-old"  # an earlier process with our pid (pid 1)
    for path in (dead, owned_dead, ours_left):
        path.mkdir(parents=True)
        (path / WEIGHTS).write_bytes(b"partial")
    alive = new_staging(cache)  # in use by this process right now: kept
    SourceLoader(LoaderConfig(cache_dir=cache))
    assert not dead.exists() and not owned_dead.exists() and not ours_left.exists()
    assert alive.exists()
    release_staging(alive)
    assert not alive.exists()


def _engine(assets, cache: Path) -> AsyncEngine:
    config = EngineConfig(
        model_path=str(assets.models["llama"]),
        max_loras=1,
        max_cpu_loras=1,
        max_lora_rank=16,
        adapter_cache_dir=str(cache),
        max_input_tokens=64,
        max_total_tokens=128,
    )
    return AsyncEngine.from_config(config)


async def _tokens(engine: AsyncEngine, adapter: str) -> list[int]:
    request = GenerationRequest(
        f"{adapter}-{os.urandom(4).hex()}", PROMPT, SamplingParams(max_new_tokens=8, ignore_eos=True), adapter
    )
    return [e.token_id async for e in engine.generate(request) if e.token_id is not None]


async def test_disk_tier_rereads_the_servers_copy_not_the_users_files(tiny_assets, tmp_path: Path) -> None:
    paths = tiny_assets.adapters["llama"]
    user = tmp_path / "user-adapter"
    shutil.copytree(paths["a4"], user)
    original = _sha(user / WEIGHTS)
    engine = _engine(tiny_assets, tmp_path / "cache")
    try:
        info = await engine.load_adapter(LoadAdapterSpec("mine", str(user)))
        assert info.sha256 == original  # computed from the files (no digest was pinned)
        before = await _tokens(engine, "mine")
        # The user's files change under the same name: another adapter's weights, then nothing.
        shutil.copyfile(paths["c16"] / WEIGHTS, user / WEIGHTS)
        await engine.load_adapter(LoadAdapterSpec("other", str(paths["b8"])))  # drops `mine` from RAM
        await _tokens(engine, "other")  # and from the one GPU slot
        assert engine.get_adapter("mine").tier == "disk"
        assert await _tokens(engine, "mine") == before
        shutil.rmtree(user)
        await _tokens(engine, "other")
        assert engine.get_adapter("mine").tier == "disk"
        assert await _tokens(engine, "mine") == before
        assert engine.stats().extra["adapter_disk_reads"] >= 2
        assert engine.get_adapter("mine").state == "ready"
    finally:
        await engine.shutdown(timeout_s=0)


async def test_hub_sources_report_the_commit_they_resolved_to(
    tiny_assets, tmp_path: Path, monkeypatch: Any
) -> None:
    hub_cache(tmp_path / "hub", "team/sql-lora", tiny_assets.adapters["llama"]["b8"], commit="c" * 40)
    monkeypatch.setenv("LORAPLEX_HF_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    engine = _engine(tiny_assets, tmp_path / "cache")
    try:
        info = await engine.load_adapter(LoadAdapterSpec("sql", "hf://team/sql-lora", revision="main"))
        assert (info.revision, info.resolved_revision) == ("main", "c" * 40)
        assert info.sha256 == _sha(tiny_assets.adapters["llama"]["b8"] / WEIGHTS)
    finally:
        await engine.shutdown(timeout_s=0)
