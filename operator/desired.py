"""The desired adapter set of one base model: what its ConfigMap carries (pods load it at start)
and what the reconciling daemon converges every pod to."""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import lru_cache

from pydantic import BaseModel, ConfigDict, TypeAdapter

from loraplex.operator.lora import LoraAdapterSpec


class DesiredAdapter(BaseModel):
    """One adapter as the server's load API and ADAPTERS_FILE take it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    source: str
    revision: str | None = None
    sha256: str | None = None
    aliases: tuple[str, ...] = ()
    pinned: bool = False
    # No access keys: the load declares it open, so it is callable before the pod's mounted keys
    # file names it (not written to the ConfigMap: a pod starting reads that file first).
    open: bool = False


def desired_adapter(served_name: str, spec: LoraAdapterSpec) -> DesiredAdapter:
    return DesiredAdapter(
        name=served_name,
        source=spec.source.uri,
        revision=spec.source.revision,
        sha256=spec.source.sha256,
        aliases=tuple(spec.aliases),
        pinned=spec.pinned,
    )


_LIST = TypeAdapter(list[DesiredAdapter])


def adapters_to_json(adapters: Iterable[DesiredAdapter]) -> str:
    """Stable text (sorted by name) so an unchanged set never rewrites the ConfigMap."""
    return _to_json(tuple(sorted(adapters, key=lambda adapter: adapter.name)))


@lru_cache(maxsize=16)
def _to_json(ordered: tuple[DesiredAdapter, ...]) -> str:
    """Cached: every pass renders the ConfigMap, and the set rarely changes between passes."""
    return (
        json.dumps(
            [adapter.model_dump(mode="json", exclude={"open"}) for adapter in ordered],
            indent=2,
            sort_keys=True,
        )
        + "\n"
    )


def adapters_from_json(text: str) -> list[DesiredAdapter]:
    return _LIST.validate_json(text)
