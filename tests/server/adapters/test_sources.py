"""Adapter sources against real files, a hub-cache layout and a real local HTTPS-style server."""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
from pathlib import Path

import huggingface_hub.constants
import pytest
from aiohttp import web

from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.sources import FetchOptions, fetch, parse_source


@pytest.mark.parametrize(
    ("uri", "scheme", "location", "subdir", "revision"),
    [
        ("file:///data/a", "file", "/data/a", "", None),
        ("/data/a", "file", "/data/a", "", None),
        ("hf://org/repo", "hf", "org/repo", "", None),
        ("hf://org/repo/sub/dir@v1", "hf", "org/repo", "sub/dir", "v1"),
        (
            "google-cloud-partnership/gemma-2-2b-it-lora-sql",
            "hf",
            "google-cloud-partnership/gemma-2-2b-it-lora-sql",
            "",
            None,
        ),
        ("gs://bucket/some/prefix", "gs", "bucket", "some/prefix", None),
        ("s3://bucket/p", "s3", "bucket", "p", None),
        ("https://example.org/a.tar.gz", "https", "https://example.org/a.tar.gz", "", None),
    ],
)
def test_parse_source(uri, scheme, location, subdir, revision) -> None:
    source = parse_source(uri)
    assert (source.scheme, source.location, source.subdir, source.revision) == (
        scheme,
        location,
        subdir,
        revision,
    )


@pytest.mark.parametrize("uri", ["", "not a source", "gs://", "ftp://x/y"])
def test_parse_rejects_unknown(uri: str) -> None:
    with pytest.raises(SourceError):
        parse_source(uri)


def test_explicit_revision_wins() -> None:
    assert parse_source("hf://org/repo@v1", revision="abc").revision == "abc"


def test_file_source_and_sha256(tiny_assets, tmp_path: Path) -> None:
    adapter = tiny_assets.adapters["llama"]["a4"]
    options = FetchOptions(cache_dir=tmp_path)
    assert fetch(parse_source(f"file://{adapter}"), options) == adapter
    digest = hashlib.sha256((adapter / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert fetch(parse_source(str(adapter)), FetchOptions(tmp_path, sha256=digest)) == adapter
    with pytest.raises(SourceError, match="sha256 mismatch") as info:
        fetch(parse_source(str(adapter)), FetchOptions(tmp_path, sha256="0" * 64))
    assert info.value.error_type == "integrity"


def test_missing_and_incomplete_directories(tiny_assets, tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such adapter directory"):
        fetch(parse_source(str(tmp_path / "nope")), FetchOptions(tmp_path))
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(tiny_assets.adapters["llama"]["a4"] / "adapter_config.json", partial)
    with pytest.raises(SourceError, match=r"missing adapter_model\.safetensors"):
        fetch(parse_source(str(partial)), FetchOptions(tmp_path))


def _hub_cache(root: Path, repo: str, subdir: str, adapter: Path, commit: str = "a" * 40) -> None:
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.copytree(adapter, repo_dir / "snapshots" / commit / subdir)


def test_hf_source_from_hub_cache_offline(tiny_assets, tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    _hub_cache(hub, "team/adapters", "sql", tiny_assets.adapters["llama"]["b8"])
    monkeypatch.setenv("LORAPLEX_HF_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    local = fetch(parse_source("hf://team/adapters/sql"), FetchOptions(cache_dir=tmp_path / "cache"))
    expected = (tiny_assets.adapters["llama"]["b8"] / "adapter_model.safetensors").read_bytes()
    assert (local / "adapter_model.safetensors").read_bytes() == expected
    with pytest.raises(SourceError) as info:
        fetch(parse_source("hf://team/missing"), FetchOptions(cache_dir=tmp_path / "cache"))
    assert info.value.error_type == "adapter_download"


def _tarball(members: dict[str, bytes], links: dict[str, str] | None = None, top: str = "") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = target
            tar.addfile(info)
    return buffer.getvalue()


@pytest.fixture
async def archive_server(aiohttp_server, tmp_path: Path):
    """A real HTTP server on 127.0.0.1 serving files (with Range support) from a folder."""
    root = tmp_path / "www"
    root.mkdir()
    app = web.Application()
    app.router.add_static("/", root)
    server = await aiohttp_server(app)
    return root, str(server.make_url("/"))


def _adapter_files(adapter: Path) -> dict[str, bytes]:
    return {
        name: (adapter / name).read_bytes() for name in ("adapter_config.json", "adapter_model.safetensors")
    }


async def test_https_tarball(archive_server, tiny_assets, tmp_path: Path) -> None:
    import asyncio

    root, base = archive_server
    files = _adapter_files(tiny_assets.adapters["gemma2"]["c16"])
    data = _tarball(files, top="c16/")
    (root / "c16.tar.gz").write_bytes(data)
    options = FetchOptions(cache_dir=tmp_path / "cache", sha256=hashlib.sha256(data).hexdigest())
    source = parse_source(base + "c16.tar.gz")
    local = await asyncio.to_thread(fetch, source, options)
    assert (local / "adapter_model.safetensors").read_bytes() == files["adapter_model.safetensors"]
    (root / "c16.tar.gz").unlink()  # a second fetch is served from the disk cache
    assert await asyncio.to_thread(fetch, source, options) == local


@pytest.mark.parametrize(
    ("members", "links", "message"),
    [
        ({"../evil": b"x"}, None, "unsafe path"),
        ({"/etc/evil": b"x"}, None, "unsafe path"),
        ({"adapter_config.json": b"{}"}, {"adapter_model.safetensors": "/etc/passwd"}, "link"),
        ({"adapter_config.json": b"x" * 5000}, None, "limit"),
    ],
)
async def test_https_unsafe_archives_refused(archive_server, tmp_path: Path, members, links, message) -> None:
    import asyncio

    root, base = archive_server
    (root / "bad.tar.gz").write_bytes(_tarball(members, links))
    options = FetchOptions(cache_dir=tmp_path / "cache", max_bytes=4096)
    with pytest.raises(SourceError, match=message):
        await asyncio.to_thread(fetch, parse_source(base + "bad.tar.gz"), options)
    assert not (tmp_path / "evil").exists() and not list((tmp_path / "cache").glob("*/adapter_config.json"))


async def test_https_resumes_partial_download(archive_server, tiny_assets, tmp_path: Path) -> None:
    import asyncio

    root, base = archive_server
    data = _tarball(_adapter_files(tiny_assets.adapters["llama"]["a4"]))
    (root / "a4.tar.gz").write_bytes(data)
    source = parse_source(base + "a4.tar.gz")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / f".{source.cache_key()}.partial").write_bytes(data[:100])  # an interrupted earlier download
    local = await asyncio.to_thread(
        fetch, source, FetchOptions(cache, sha256=hashlib.sha256(data).hexdigest())
    )
    assert (local / "adapter_config.json").exists()


async def test_https_not_found(archive_server, tmp_path: Path) -> None:
    import asyncio

    _, base = archive_server
    with pytest.raises(SourceError, match="HTTP 404"):
        await asyncio.to_thread(fetch, parse_source(base + "nope.tar.gz"), FetchOptions(tmp_path))
