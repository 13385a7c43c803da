"""Where adapters come from: parse a source URI and fetch it into a local directory.

Schemes (DESIGN.md §2): `file:///abs/dir` or a plain local path, `hf://org/repo[/subdir][@rev]`
or a bare hub id `org/repo`, `gs://bucket/prefix`, `s3://bucket/prefix` and
`https://.../adapter.tar.gz`. Remote sources land in a disk cache keyed by source + revision;
a fetch that finds its cache entry complete does no I/O beyond a stat.

Fetching is blocking I/O: callers run it in a worker thread, never on the decode loop.
`sha256`, when given, is checked against `adapter_model.safetensors` (or the archive for https).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from loraplex.server.adapters.archive import download_https, extract_tarball
from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.fetch_partial import discard_if_stale, partial_path
from loraplex.server.adapters.owned_store import REVISION_FILE, new_staging, release_staging

WEIGHT_FILES = ("adapter_model.safetensors",)
ADAPTER_FILES = ("adapter_config.json", *WEIGHT_FILES)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class AdapterSource:
    """A parsed source URI. `location` is a path, a repo id, a bucket/prefix or a URL."""

    scheme: str  # file | hf | gs | s3 | https
    location: str
    subdir: str = ""
    revision: str | None = None

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return f"file://{self.location}"
        if self.scheme == "https":
            return self.location
        sub = f"/{self.subdir}" if self.subdir else ""
        rev = f"@{self.revision}" if self.revision else ""
        return f"{self.scheme}://{self.location}{sub}{rev}"

    def cache_key(self) -> str:
        digest = hashlib.sha256(f"{self.uri}\0{self.revision or ''}".encode()).hexdigest()[:24]
        readable = re.sub(r"[^\w.-]+", "_", f"{self.location}/{self.subdir}").strip("_")[-60:]
        return f"{readable}-{digest}"


def parse_source(uri: str, revision: str | None = None) -> AdapterSource:
    """Parse `uri`; an explicit `revision` wins over one written as `@rev` in an hf URI."""
    uri = uri.strip()
    if not uri:
        raise SourceError("empty adapter source", "validation")
    _check_printable(uri)
    if revision and uri.startswith(("file://", "/", "./", "../", "https://", "http://")):
        # Nothing versions a directory or a URL: accepting a revision here would ignore it.
        raise SourceError(
            f"{uri!r}: revision {revision!r} can't be honoured here; pin with sha256", "validation"
        )
    if uri.startswith("file://"):
        return AdapterSource("file", _absolute(urlparse(uri).path or uri[len("file://") :]))
    if uri.startswith("/") or uri.startswith("./") or uri.startswith("../"):
        return AdapterSource("file", _absolute(uri))
    if uri.startswith("https://") or uri.startswith("http://"):
        return AdapterSource("https", uri)
    if uri.startswith(("gs://", "s3://")):
        scheme, rest = uri.split("://", 1)
        bucket, _, prefix = rest.partition("/")
        if not bucket:
            raise SourceError(f"{uri!r}: missing bucket name", "validation")
        return AdapterSource(scheme, bucket, prefix.strip("/"), revision)
    rest = uri[len("hf://") :] if uri.startswith("hf://") else uri
    rest, _, inline_rev = rest.partition("@")
    parts = [p for p in rest.split("/") if p]
    if len(parts) < 2 or not HUB_ID.match("/".join(parts[:2])):
        raise SourceError(
            f"{uri!r} is not a known adapter source (file://, hf://, gs://, s3://, https://)", "validation"
        )
    return AdapterSource("hf", "/".join(parts[:2]), "/".join(parts[2:]), revision or inline_rev or None)


def _absolute(path: str) -> str:
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError, ValueError) as exc:  # a symlink loop, an unknown ~user
        raise SourceError(f"{path!r}: not a usable path ({exc})", "validation") from exc


def _check_printable(uri: str) -> None:
    """A NUL byte or a lone surrogate can't name a file or URL: refuse before any OS call."""
    if "\x00" in uri:
        raise SourceError("the adapter source contains a NUL byte", "validation")
    try:
        uri.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SourceError(f"the adapter source is not valid text ({exc.reason})", "validation") from exc


@dataclass(frozen=True)
class FetchOptions:
    cache_dir: Path
    token: str | None = None  # hub / bearer token
    sha256: str | None = None
    max_bytes: int = 2 << 30
    progress: Callable[[int, int | None], None] | None = None  # (bytes done, total)
    credentials: Mapping[str, str] | None = None  # gs/s3 keys from source.credentialsSecretRef


def fetch(source: AdapterSource, options: FetchOptions) -> Path:
    """Return a local directory holding `adapter_config.json` and the weights."""
    cacheable = True
    if source.scheme in ("gs", "s3"):
        from loraplex.server.adapters.bucket_fetch import pin_revision

        source, cacheable = pin_revision(source, options)
    directory = (
        Path(source.location) if source.scheme == "file" else _fetch_cached(source, options, cacheable)
    )
    _check_layout(directory, source)
    if options.sha256 and source.scheme != "https":
        _verify_sha256(directory / WEIGHT_FILES[0], options.sha256)
    return directory


def _fetch_cached(source: AdapterSource, options: FetchOptions, cacheable: bool = True) -> Path:
    final = Path(options.cache_dir) / source.cache_key()
    if cacheable and (final / ".complete").exists():
        return final
    staging = new_staging(final.parent)  # swept at start-up if this process dies mid-fetch
    try:
        FETCHERS[source.scheme](source, staging, options)
        (staging / ".complete").write_text(source.uri)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    finally:
        release_staging(staging)  # also on cancellation, a timeout or any failure
    return final


def _fetch_hf(source: AdapterSource, staging: Path, options: FetchOptions) -> None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    prefix = f"{source.subdir}/" if source.subdir else ""
    try:
        snapshot = snapshot_download(
            source.location,
            revision=source.revision,
            allow_patterns=[prefix + name for name in ADAPTER_FILES],
            token=options.token,
            cache_dir=os.environ.get("LORAPLEX_HF_CACHE") or None,
        )
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise SourceError(f"hf://{source.location}: {exc}", "adapter_download") from exc
    for name in ADAPTER_FILES:
        found = Path(snapshot) / prefix / name
        if found.exists():
            shutil.copyfile(found, staging / name)
    (staging / REVISION_FILE).write_text(
        Path(snapshot).name
    )  # snapshots/<commit>: what the revision resolved to


def _fetch_https(source: AdapterSource, staging: Path, options: FetchOptions) -> None:
    partial = partial_path(staging.parent, source.cache_key())
    discard_if_stale(partial)  # too old to resume: start over (server/adapters/fetch_partial.py)
    archive = download_https(source.location, partial, options.max_bytes, options.token, options.progress)
    if options.sha256:
        try:
            _verify_sha256(archive, options.sha256)
        except SourceError:
            archive.unlink(missing_ok=True)  # never resume onto bytes that failed the check
            raise
    extract_tarball(archive, staging, options.max_bytes)
    archive.unlink(missing_ok=True)
    _hoist_single_dir(staging)


def _fetch_bucket(source: AdapterSource, staging: Path, options: FetchOptions) -> None:
    from loraplex.server.adapters.bucket_fetch import fetch_adapter

    fetch_adapter(source, staging, options)


FETCHERS: dict[str, Callable[[AdapterSource, Path, FetchOptions], None]] = {
    "hf": _fetch_hf,
    "https": _fetch_https,
    "gs": _fetch_bucket,
    "s3": _fetch_bucket,
}


def _hoist_single_dir(staging: Path) -> None:
    """Archives often wrap the adapter in one top folder: move its files up."""
    entries = [p for p in staging.iterdir() if not p.name.startswith(".")]
    if len(entries) == 1 and entries[0].is_dir() and not (staging / "adapter_config.json").exists():
        for item in entries[0].iterdir():
            item.rename(staging / item.name)
        entries[0].rmdir()


def _check_layout(directory: Path, source: AdapterSource) -> None:
    if not directory.is_dir():
        raise SourceError(f"{source.uri}: no such adapter directory", "adapter_not_found")
    missing = [name for name in ADAPTER_FILES if not (directory / name).is_file()]
    if missing:
        raise SourceError(
            f"{source.uri}: missing {', '.join(missing)} (not a PEFT LoRA adapter)", "validation"
        )


def _verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected.lower().removeprefix("sha256:"):
        raise SourceError(
            f"sha256 mismatch for {path.name}: got {digest.hexdigest()}, expected {expected}", "integrity"
        )
