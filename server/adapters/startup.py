"""Adapters named at start: `LORA_ADAPTERS` and the mounted adapters file, which is watched.

The operator mounts the base's desired adapter list as a ConfigMap file (DESIGN.md §3).
Kubernetes updates such a mount by swapping a symlink, so the watcher compares the file's
*content*, not its mtime: every `poll_s` seconds it re-reads the file, loads entries that are
new or changed and unloads entries that were removed. It only ever unloads adapters that the
file itself brought in; adapters loaded through the API or `LORA_ADAPTERS` are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import yaml

from loraplex.server.engine_api import Engine, EngineError, LoadAdapterSpec, UnknownAdapterError

log = logging.getLogger(__name__)


def parse_lora_adapters(value: str) -> tuple[LoadAdapterSpec, ...]:
    """`id`, `id@rev` or `name=source[@rev]`, comma separated (TGI's LORA_ADAPTERS, plus names)."""
    specs = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        name, _, source = item.rpartition("=") if "=" in item else ("", "", item)
        source, _, revision = source.partition("@") if "://" not in source else (source, "", "")
        if not source:
            raise ValueError(f"adapter {item!r} has no source")
        specs.append(LoadAdapterSpec(name=name or source, source=source, revision=revision or None))
    return tuple(specs)


def parse_adapters_document(text: str, origin: str) -> tuple[LoadAdapterSpec, ...]:
    """A YAML or JSON list (or `{adapters: [...]}`) of {name, source|uri, revision, sha256, aliases, pinned}."""
    data = yaml.safe_load(text) or []
    entries = data.get("adapters", []) if isinstance(data, dict) else data
    if not isinstance(entries, list):
        raise ValueError(f"{origin}: expected a list of adapters")
    specs = []
    for entry in entries:
        source = entry.get("source") or entry.get("uri") if isinstance(entry, dict) else None
        if not source or not entry.get("name"):
            raise ValueError(f"{origin}: every adapter needs `name` and `source`: {entry!r}")
        specs.append(
            LoadAdapterSpec(
                name=str(entry["name"]),
                source=str(source),
                revision=entry.get("revision"),
                sha256=entry.get("sha256"),
                aliases=tuple(entry.get("aliases") or ()),
                pinned=bool(entry.get("pinned", False)),
            )
        )
    return tuple(specs)


def read_adapters_file(path: Path) -> tuple[LoadAdapterSpec, ...]:
    return parse_adapters_document(path.read_text(), str(path))


class AdaptersFileWatcher:
    """Keeps the engine's adapters in step with the adapters file (see the module docstring)."""

    def __init__(self, path: Path, poll_s: float = 5.0) -> None:
        self.path = path
        self.poll_s = poll_s
        self._text: str | None = None
        self._applied: dict[str, LoadAdapterSpec] = {}

    def read_initial(self) -> tuple[LoadAdapterSpec, ...]:
        """Read the file once; what it lists is loaded by the startup path, not by the watcher."""
        text = self.path.read_text()
        specs = parse_adapters_document(text, str(self.path))
        self._text, self._applied = text, {spec.name: spec for spec in specs}
        return specs

    async def check(self, engine: Engine) -> bool:
        """Apply the file if its content changed; True when it did."""
        try:
            text = await asyncio.to_thread(self.path.read_text)
        except OSError as exc:  # mid-swap, or unmounted: keep the last good list
            log.warning("adapters file unreadable", extra={"path": str(self.path), "error": str(exc)})
            return False
        if text == self._text:
            return False
        self._text = text
        try:
            specs = {spec.name: spec for spec in parse_adapters_document(text, str(self.path))}
        except (ValueError, AttributeError, yaml.YAMLError) as exc:
            log.error("adapters file invalid, ignored", extra={"path": str(self.path), "error": str(exc)})
            return False
        removed = [name for name in self._applied if name not in specs]
        changed = [spec for name, spec in specs.items() if self._applied.get(name) != spec]
        log.info("adapters file changed", extra={"load": [s.name for s in changed], "unload": removed})
        self._applied = specs
        await asyncio.gather(
            *(_unload(engine, name) for name in removed), *(_load(engine, spec) for spec in changed)
        )
        return True

    async def run(self, engine: Engine) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check(engine)
            except Exception:  # a watcher bug must not stop serving
                log.exception("adapters file check failed")

    def cleanup_ctx(self, engine: Engine) -> Callable[[Any], AsyncIterator[None]]:
        """An aiohttp `cleanup_ctx` entry that watches while the app runs."""

        async def watch(_: Any) -> AsyncIterator[None]:
            task = asyncio.create_task(self.run(engine))
            yield
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

        return watch


async def _load(engine: Engine, spec: LoadAdapterSpec) -> None:
    try:
        await engine.load_adapter(spec)
    except EngineError as exc:
        log.error("adapter from file failed", extra={"adapter": spec.name, "error": str(exc)})


async def _unload(engine: Engine, name: str) -> None:
    with contextlib.suppress(UnknownAdapterError):
        await engine.unload_adapter(name)
