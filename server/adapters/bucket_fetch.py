"""Fetch a PEFT adapter from gs://bucket/prefix or s3://bucket/prefix (see object_store.py).

`revision` pins the weights object (`adapter_model.safetensors`): its GCS generation or S3
version id, the object `sha256` also names. A source without one is pinned at fetch time to the
version the store reports, so the disk cache never serves weights that were overwritten since.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from loraplex.server.adapters.errors import SourceError
from loraplex.server.adapters.object_store import ObjectStore, StoredObject, download, open_store

if TYPE_CHECKING:
    from loraplex.server.adapters.sources import AdapterSource, FetchOptions

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


def pin_revision(source: AdapterSource, options: FetchOptions) -> tuple[AdapterSource, bool]:
    """(source with the weights' live version as its revision, whether that version is cacheable)."""
    if source.revision:
        return source, True
    weights = _weights(_store(source, options), source)
    if weights.version is None:  # an unversioned S3 bucket: nothing names these bytes
        return source, False
    return replace(source, revision=weights.version), True


def fetch_adapter(source: AdapterSource, staging: Path, options: FetchOptions) -> None:
    store = _store(source, options)
    weights = _weights(store, source)
    config = store.stat(_key(source, CONFIG_FILE))
    if weights.size + config.size > options.max_bytes:
        raise SourceError(
            f"{store.url}/{source.subdir}: {weights.size + config.size} bytes, over the {options.max_bytes} limit",
            "too_large",
        )
    download(store, config, staging / CONFIG_FILE)
    download(store, weights, staging / WEIGHTS_FILE, options.progress)


def _store(source: AdapterSource, options: FetchOptions) -> ObjectStore:
    return open_store(source.scheme, source.location, options.credentials)


def _key(source: AdapterSource, name: str) -> str:
    return f"{source.subdir}/{name}" if source.subdir else name


def _weights(store: ObjectStore, source: AdapterSource) -> StoredObject:
    try:
        return store.stat(_key(source, WEIGHTS_FILE), source.revision)
    except SourceError as exc:
        if exc.error_type != "adapter_not_found" or source.revision:
            raise
        _explain_missing(store, source, exc)
        raise


def _explain_missing(store: ObjectStore, source: AdapterSource, exc: SourceError) -> None:
    """A prefix that holds several adapters (or none) says so, instead of a bare 404."""
    prefix = f"{source.subdir}/" if source.subdir else ""
    inside = sorted(
        {
            o.key[len(prefix) :].rsplit("/", 1)[0]
            for o in store.list(prefix)
            if o.key.endswith(f"/{CONFIG_FILE}")
        }
    )
    if inside:
        raise SourceError(
            f"{store.url}/{prefix} holds {len(inside)} adapters ({', '.join(inside[:10])}): point the source at one",
            "validation",
        ) from exc
