"""Streaming, resumable, size-capped HTTPS downloads and safe tarball extraction."""

from __future__ import annotations

import http.client
import tarfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from loraplex.server.adapters.errors import SourceError

CHUNK = 1 << 20


def download_https(
    url: str,
    dest: Path,
    max_bytes: int,
    token: str | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    timeout_s: float = 60.0,
) -> Path:
    """Stream `url` into `dest`, resuming a partial file with a Range request."""
    have = dest.stat().st_size if dest.exists() else 0
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    if have:
        request.add_header("Range", f"bytes={have}-")
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already whole
            return dest
        raise SourceError(f"{url}: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise SourceError(f"{url}: {exc}") from exc
    with response:
        resumed = response.status == 206
        length = response.headers.get("Content-Length")
        total = (int(length) + (have if resumed else 0)) if length else None
        if total is not None and total > max_bytes:
            raise SourceError(f"{url}: {total} bytes is over the {max_bytes}-byte limit", "too_large")
        done = have if resumed else 0
        with dest.open("ab" if resumed else "wb") as out:
            try:
                for block in iter(lambda: response.read(CHUNK), b""):
                    done += len(block)
                    if done > max_bytes:
                        raise SourceError(f"{url}: more than the {max_bytes}-byte limit", "too_large")
                    out.write(block)
                    if progress:
                        progress(done, total)
            except (http.client.HTTPException, OSError) as exc:  # cut off, or timed out mid-body
                raise SourceError(f"{url}: download interrupted after {done} bytes ({exc!r})") from exc
    if total is not None and done < total:
        raise SourceError(f"{url}: download interrupted after {done} of {total} bytes")
    return dest


def extract_tarball(archive: Path, dest: Path, max_bytes: int) -> None:
    """Extract regular files and folders only; refuse anything that could land outside `dest`."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            _check_members(members, max_bytes)
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:  # also a gzip stream cut short
        raise SourceError(f"{archive.name}: not a readable tar archive ({exc})", "validation") from exc


def _check_members(members: list[tarfile.TarInfo], max_bytes: int) -> None:
    total = 0
    for member in members:
        path = PurePosixPath(member.name)
        if path.is_absolute() or ".." in path.parts:
            raise SourceError(f"unsafe path in archive: {member.name!r}", "validation")
        if not (member.isfile() or member.isdir()):
            raise SourceError(f"archive entry {member.name!r} is a link or device: refused", "validation")
        total += member.size
        if total > max_bytes:
            raise SourceError(f"archive expands past the {max_bytes}-byte limit", "too_large")
