"""Interrupted https downloads are resumed while fresh, started over once stale, and swept at
start-up when older than `LORAPLEX_PARTIAL_MAX_AGE_S` (server/adapters/fetch_partial.py)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import tarfile
import time
from pathlib import Path

import pytest
from aiohttp import web

from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.fetch_partial import (
    DEFAULT_PARTIAL_MAX_AGE_S,
    partial_max_age_s,
    partial_path,
    sweep_partials,
)
from loraplex.server.adapters.loader import LoaderConfig, SourceLoader
from loraplex.server.adapters.sources import FetchOptions, fetch, parse_source

DAY = 24 * 3600


def _tarball(adapter: Path) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            tar.add(adapter / name, arcname=name)
    return buffer.getvalue()


@pytest.fixture
async def served(aiohttp_server, tiny_assets, tmp_path: Path):
    """A real HTTP server (Range support) serving a4's tarball; (source, its bytes, cache dir)."""
    root = tmp_path / "www"
    root.mkdir()
    data = _tarball(tiny_assets.adapters["llama"]["a4"])
    (root / "a4.tar.gz").write_bytes(data)
    app = web.Application()
    app.router.add_static("/", root)
    server = await aiohttp_server(app)
    cache = tmp_path / "cache"
    cache.mkdir()
    return parse_source(str(server.make_url("/a4.tar.gz"))), data, cache


def _age(path: Path, seconds: float) -> None:
    old = time.time() - seconds
    os.utime(path, (old, old))


def _leftover(source, cache: Path, stale_bytes: bytes, age_s: float) -> Path:
    """What an earlier download of another version of the file left behind, `age_s` ago."""
    partial = partial_path(cache, source.cache_key())
    partial.write_bytes(stale_bytes)
    _age(partial, age_s)
    return partial


async def test_a_fresh_partial_is_resumed(served) -> None:
    source, data, cache = served
    _leftover(source, cache, b"x" * 100, age_s=60)  # other bytes: resuming splices them in
    options = FetchOptions(cache, sha256=hashlib.sha256(data).hexdigest())
    with pytest.raises(SourceError, match="sha256"):
        await asyncio.to_thread(fetch, source, options)


async def test_a_stale_partial_is_downloaded_again(served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_PARTIAL_MAX_AGE_S", raising=False)
    source, data, cache = served
    partial = _leftover(source, cache, b"x" * 100, age_s=DAY + 60)
    local = await asyncio.to_thread(
        fetch, source, FetchOptions(cache, sha256=hashlib.sha256(data).hexdigest())
    )
    assert (local / "adapter_config.json").exists()
    assert not partial.exists()


async def test_the_age_is_configurable(served, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_PARTIAL_MAX_AGE_S", "30")
    source, data, cache = served
    _leftover(source, cache, b"x" * 100, age_s=60)  # fresh by default, stale at 30 s
    local = await asyncio.to_thread(
        fetch, source, FetchOptions(cache, sha256=hashlib.sha256(data).hexdigest())
    )
    assert (local / "adapter_config.json").exists()


def test_start_up_sweeps_stale_partials_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_PARTIAL_MAX_AGE_S", raising=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    stale, fresh = cache / ".old.partial", cache / ".new.partial"
    stale.write_bytes(b"a")
    fresh.write_bytes(b"b")
    _age(stale, DAY + 60)
    _age(fresh, DAY - 600)
    other = cache / "keep.partial"  # not one of ours (ours start with a dot)
    other.write_bytes(b"c")
    _age(other, 10 * DAY)
    SourceLoader(LoaderConfig(cache_dir=cache))
    assert not stale.exists()
    assert fresh.exists() and other.exists()


def test_sweep_with_zero_removes_every_partial(tmp_path: Path) -> None:
    (tmp_path / ".a.partial").write_bytes(b"a")
    assert sweep_partials(tmp_path, max_age_s=0) == [tmp_path / ".a.partial"]
    assert sweep_partials(tmp_path / "missing") == []


@pytest.mark.parametrize(
    ("value", "expected"),
    [("", DEFAULT_PARTIAL_MAX_AGE_S), ("3600", 3600.0), ("-5", 0.0), ("soon", DEFAULT_PARTIAL_MAX_AGE_S)],
)
def test_partial_max_age_setting(monkeypatch: pytest.MonkeyPatch, value: str, expected: float) -> None:
    monkeypatch.setenv("LORAPLEX_PARTIAL_MAX_AGE_S", value)
    assert partial_max_age_s() == expected
