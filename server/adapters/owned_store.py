"""The server's own copy of every adapter it serves, keyed by the files' sha256.

At load the adapter's files are copied (hard-linked when our own fetcher wrote them) into
`<cache>/owned/<digest>/` and parsed from there; the host and disk tiers read back only that
copy, with its digest checked, so what is served under one `load_generation` never changes
when the user's files change or disappear (DESIGN.md §5, issue 15).

Staging directories (`.fetch-<pid>-*`) are where downloads and copies are assembled before one
atomic rename; `sweep_staging` removes those a crashed or killed process left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from loraplex.server.adapters.errors import SourceError

STAGING_PREFIX = ".fetch-"
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
REVISION_FILE = ".revision"  # the commit a hub revision resolved to, written by the hub fetcher
_STALE_UNOWNED_S = 3600.0  # staging dirs without a pid in their name (older versions)
_active: set[Path] = set()  # staging dirs of this process still being filled
_active_lock = threading.Lock()


@dataclass(frozen=True)
class OwnedCopy:
    directory: Path
    sha256: str  # of adapter_model.safetensors: what `status.resolved.sha256` reports
    revision: str | None  # the hub commit, when the source said


def new_staging(parent: Path) -> Path:
    """A fresh staging directory under `parent`, marked as in use by this process."""
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))
    with _active_lock:
        _active.add(staging)
    return staging


def release_staging(staging: Path) -> None:
    """Remove `staging` (renamed away already, or abandoned) and forget it."""
    shutil.rmtree(staging, ignore_errors=True)
    with _active_lock:
        _active.discard(staging)


def sweep_staging(root: Path) -> list[Path]:
    """Remove staging dirs left by processes that are gone (crash, OOM kill, restart); returns them."""
    removed = []
    for parent in (root, root / "owned"):
        if not parent.is_dir():
            continue
        for path in parent.glob(f"{STAGING_PREFIX}*"):
            if _is_abandoned(path):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def _is_abandoned(path: Path) -> bool:
    with _active_lock:
        if path in _active:
            return False
    pid_text = path.name[len(STAGING_PREFIX) :].split("-", 1)[0]
    if not pid_text.isdigit():
        with contextlib.suppress(OSError):
            return time.time() - path.stat().st_mtime > _STALE_UNOWNED_S
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True  # ours, and not in use: left by an earlier process that had our pid (pid 1)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return False


def own_copy(directory: Path, root: Path) -> OwnedCopy:
    """Link or copy `directory`'s adapter files into `root/owned/<digest>`; an existing copy is reused."""
    owned_root = root / "owned"
    if directory.resolve().parent == owned_root.resolve():
        return OwnedCopy(directory, file_sha256(directory / WEIGHTS_FILE), _revision(directory))
    # Files our own fetchers wrote are never rewritten in place: a hard link is enough. A user's
    # files may be, so those are copied.
    link = directory.resolve().is_relative_to(root.resolve())
    staging = new_staging(owned_root)
    try:
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if (directory / name).is_file():
                _link_or_copy(directory / name, staging / name, link)
        weights_digest = file_sha256(staging / WEIGHTS_FILE)
        config_digest = file_sha256(staging / CONFIG_FILE)
        final = owned_root / f"{weights_digest}-{config_digest[:16]}"
        if not final.is_dir():
            try:
                os.replace(staging, final)
            except OSError:
                if not final.is_dir():  # not a concurrent load of the same files: a real failure
                    raise
        # The revision is the source's (the same files may have come from another source before).
        return OwnedCopy(final, weights_digest, _revision(directory))
    except OSError as exc:
        raise SourceError(
            f"cannot copy the adapter into the server's cache {owned_root}: {exc}", "source"
        ) from exc
    finally:
        release_staging(staging)


def _link_or_copy(source: Path, target: Path, link: bool) -> None:
    if link:
        with contextlib.suppress(OSError):  # another filesystem, or links not allowed: copy
            os.link(source, target)
            return
    shutil.copyfile(source, target)


def _revision(directory: Path) -> str | None:
    path = directory / REVISION_FILE
    return path.read_text().strip() or None if path.is_file() else None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
