"""Interrupted https downloads (`<cache>/.<key>.partial`) are kept so a retry resumes them, but
not forever: one older than `partial_max_age_s()` is removed at start-up (`sweep_partials`) and
is never resumed (`discard_if_stale`), it is downloaded again from the start.

The age is the file's modification time, which every appended block refreshes, so a download in
progress is never taken for a stale one. Stale partials cost disk, and resuming one with a Range
request splices old bytes onto what the URL serves today (the sha256 check, when given, would
refuse the result; without one nothing would). Default: one day; `LORAPLEX_PARTIAL_MAX_AGE_S`
sets it (0: never resume, sweep every partial at start-up).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
DEFAULT_PARTIAL_MAX_AGE_S = 24 * 3600.0


def partial_max_age_s() -> float:
    value = os.environ.get("LORAPLEX_PARTIAL_MAX_AGE_S", "")
    try:
        return max(0.0, float(value)) if value.strip() else DEFAULT_PARTIAL_MAX_AGE_S
    except ValueError:
        log.warning(
            "LORAPLEX_PARTIAL_MAX_AGE_S=%r is not a number; using %s", value, DEFAULT_PARTIAL_MAX_AGE_S
        )
        return DEFAULT_PARTIAL_MAX_AGE_S


def partial_path(cache_dir: Path, cache_key: str) -> Path:
    return cache_dir / f".{cache_key}{PARTIAL_SUFFIX}"


def _is_stale(path: Path, max_age_s: float, now: float) -> bool:
    try:
        return now - path.stat().st_mtime >= max_age_s
    except OSError:  # gone meanwhile
        return False


def discard_if_stale(partial: Path, max_age_s: float | None = None) -> bool:
    """Remove `partial` when it is too old to resume; True when it was removed."""
    limit = partial_max_age_s() if max_age_s is None else max_age_s
    if not partial.is_file() or not _is_stale(partial, limit, time.time()):
        return False
    partial.unlink(missing_ok=True)
    log.info("stale partial download discarded", extra={"path": str(partial), "max_age_s": limit})
    return True


def sweep_partials(cache_dir: Path, max_age_s: float | None = None) -> list[Path]:
    """Remove the partial downloads in `cache_dir` older than the limit; returns them."""
    limit = partial_max_age_s() if max_age_s is None else max_age_s
    if not cache_dir.is_dir():
        return []
    now = time.time()
    removed = []
    for path in cache_dir.glob(f".*{PARTIAL_SUFFIX}"):
        if path.is_file() and _is_stale(path, limit, now):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed
