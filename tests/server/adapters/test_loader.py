"""SourceLoader: any source to validated weights, each refusal with its own error_type."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
from adapter_cases import BAD_ADAPTERS, hub_cache, traversal_tarball
from aiohttp import web
from transformers import AutoConfig

from loraplex.server.adapters.loader import LoaderConfig, SourceLoader, base_model_matches
from loraplex.server.engine_api import AdapterLoadError, LoadAdapterSpec

MAX_RANK = 16


@pytest.fixture(scope="module")
def llama_config(tiny_assets):
    return AutoConfig.from_pretrained(tiny_assets.models["llama"])


def loader(tmp_path: Path, **overrides) -> SourceLoader:
    settings = {"base_model_names": ("/models/tiny-llama",), "cache_dir": tmp_path / "cache"}
    return SourceLoader(LoaderConfig(**(settings | overrides)))


@pytest.mark.parametrize("case", sorted(BAD_ADAPTERS))
def test_bad_adapters_get_their_own_error_type(case, tiny_assets, llama_config, tmp_path) -> None:
    build, error_type, fragment = BAD_ADAPTERS[case]
    path = build(tiny_assets.adapters["llama"]["c16"], tmp_path / case)
    with pytest.raises(AdapterLoadError, match=fragment) as info:
        loader(tmp_path)(LoadAdapterSpec(case, str(path)), llama_config, MAX_RANK)
    assert info.value.error_type == error_type


def test_size_limit_and_integrity(tiny_assets, llama_config, tmp_path) -> None:
    path = tiny_assets.adapters["llama"]["a4"]
    with pytest.raises(AdapterLoadError, match="MAX_ADAPTER_BYTES") as info:
        loader(tmp_path, max_adapter_bytes=1000)(LoadAdapterSpec("a", str(path)), llama_config, MAX_RANK)
    assert info.value.error_type == "too_large"
    with pytest.raises(AdapterLoadError, match="sha256 mismatch") as info:
        loader(tmp_path)(LoadAdapterSpec("a", str(path), sha256="0" * 64), llama_config, MAX_RANK)
    assert info.value.error_type == "integrity"
    digest = hashlib.sha256((path / "adapter_model.safetensors").read_bytes()).hexdigest()
    weights = loader(tmp_path)(LoadAdapterSpec("a", str(path), sha256=digest), llama_config, MAX_RANK)
    assert weights.rank == 4 and weights.target_modules == ("q_proj", "v_proj")


def test_base_model_mismatch_warns_or_refuses(tiny_assets, llama_config, tmp_path, caplog) -> None:
    other = tmp_path / "other-base"
    shutil.copytree(tiny_assets.adapters["llama"]["a4"], other)
    config = json.loads((other / "adapter_config.json").read_text())
    (other / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other"}))
    spec = LoadAdapterSpec("o", str(other))
    with caplog.at_level(logging.WARNING):
        assert loader(tmp_path)(spec, llama_config, MAX_RANK).rank == 4
    assert "trained on 'org/other'" in caplog.text
    with pytest.raises(AdapterLoadError, match="STRICT_BASE_MODEL") as info:
        loader(tmp_path, strict_base_model=True)(spec, llama_config, MAX_RANK)
    assert info.value.error_type == "base_model_mismatch"
    good = LoadAdapterSpec("g", str(tiny_assets.adapters["llama"]["a4"]))  # trained on "tiny-llama"
    assert loader(tmp_path, strict_base_model=True)(good, llama_config, MAX_RANK).rank == 4


def test_base_model_names_match_local_copies_of_a_hub_id() -> None:
    assert base_model_matches("google/gemma-2-2b-it", ("/models/gemma-2-2b-it",))
    assert base_model_matches("hf://google/gemma-2-2b-it@main", ("google/gemma-2-2b-it",))
    assert not base_model_matches("google/gemma-2-2b", ("google/gemma-2-2b-it", "gemma"))


def test_hf_source_through_the_hub_cache(tiny_assets, llama_config, tmp_path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    hub_cache(hub, "team/sql-lora", tiny_assets.adapters["llama"]["b8"])
    monkeypatch.setenv("LORAPLEX_HF_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    weights = loader(tmp_path)(LoadAdapterSpec("sql", "hf://team/sql-lora@main"), llama_config, MAX_RANK)
    assert weights.rank == 8
    with pytest.raises(AdapterLoadError) as info:
        loader(tmp_path)(LoadAdapterSpec("x", "hf://team/missing"), llama_config, MAX_RANK)
    assert info.value.error_type == "adapter_download"


async def test_https_tarball_with_path_traversal_is_refused(
    aiohttp_server, tiny_assets, llama_config, tmp_path
) -> None:
    import asyncio

    www = tmp_path / "www"
    www.mkdir()
    (www / "evil.tar.gz").write_bytes(traversal_tarball(tiny_assets.adapters["llama"]["a4"]))
    app = web.Application()
    app.router.add_static("/", www)
    server = await aiohttp_server(app)
    spec = LoadAdapterSpec("evil", str(server.make_url("/evil.tar.gz")))
    with pytest.raises(AdapterLoadError, match="unsafe path") as info:
        await asyncio.to_thread(loader(tmp_path), spec, llama_config, MAX_RANK)
    assert info.value.error_type == "validation"
    assert not (tmp_path / "evil.txt").exists()
