"""LoraAdapter (`lora`): one fine-tune attached to a BaseModelDeployment and hot-loaded into its pods."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationError

from loraplex.operator.common import (
    DNS_LABEL,
    DNS_SUBDOMAIN,
    Condition,
    K8sModel,
    LocalObjectReference,
    SecretKeyRef,
    list_map,
)

KIND = "LoraAdapter"
PLURAL = "loraadapters"

# Served names never contain "/": `<namespace>/<name>` is the always-unambiguous request name.
SERVED_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._:-]*[A-Za-z0-9])?$"
ServedName = Annotated[str, Field(max_length=128, pattern=SERVED_NAME)]


class BaseModelRef(K8sModel):
    """The BaseModelDeployment this adapter attaches to. Immutable."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    namespace: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL,
        description="Defaults to the adapter's namespace; others only where the base admits them.",
    )


class AdapterSource(K8sModel):
    """Where the weights are: `hf://org/repo[/subdir]`, a bare hub id, `gs://bucket/prefix`,
    `s3://bucket/prefix`, `https://.../adapter.tar.gz` or `file:///abs/dir`."""

    uri: str = Field(min_length=1, max_length=2048)
    revision: str | None = Field(default=None, max_length=256)
    sha256: str | None = Field(default=None, pattern=r"^[a-f0-9]{64}$")
    credentials_secret_ref: LocalObjectReference | None = None


class AccessSpec(K8sModel):
    """Who may call this adapter: requests must carry one of these keys (Bearer)."""

    api_key_secret_refs: list[SecretKeyRef] = Field(default_factory=list, max_length=64)


class DeletionPolicy(StrEnum):
    UNLOAD = "Unload"
    ORPHAN = "Orphan"


class LoraAdapterSpec(K8sModel):
    base_model: BaseModelRef
    source: AdapterSource
    served_name: ServedName | None = Field(default=None, description="Defaults to metadata.name.")
    aliases: list[ServedName] = Field(default_factory=list, max_length=16)
    pinned: bool = Field(default=False, description="Never evicted from GPU slots.")
    deletion_policy: DeletionPolicy = Field(
        default=DeletionPolicy.UNLOAD,
        description="Unload: deletion waits until every pod unloaded it. Orphan: never blocks.",
    )
    access: AccessSpec | None = None


_EMPTY: Mapping[str, Any] = {}
_PARSED: dict[int, tuple[Mapping[str, Any], LoraAdapterSpec | ValidationError]] = {}
_PARSED_MAX = 16384  # specs kept (a few KB each): past this the memo starts over


def spec_of(body: Mapping[str, Any]) -> LoraAdapterSpec:
    """The body's spec, validated (raises ValidationError). A pass reads every adapter's spec in
    several places, 1000 adapters a pass: each spec mapping is validated once. The memo is keyed
    by the mapping's identity and holds it (so the id is not reused): the operator's bodies are
    snapshots that a watch event replaces and nothing edits in place."""
    raw = body.get("spec") or _EMPTY
    hit = _PARSED.get(id(raw))
    if hit is None or hit[0] is not raw:
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.clear()
        try:
            parsed: LoraAdapterSpec | ValidationError = LoraAdapterSpec.model_validate(raw)
        except ValidationError as error:
            parsed = error
        hit = _PARSED[id(raw)] = (raw, parsed)
    if isinstance(hit[1], ValidationError):
        raise hit[1]
    return hit[1]


class LoraPhase(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    PARTIALLY_READY = "PartiallyReady"
    FAILED = "Failed"


class ResolvedAdapter(K8sModel):
    """What the engine found when it loaded the adapter."""

    revision: str | None = None
    sha256: str | None = None
    size_bytes: int | None = None
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = Field(default_factory=list)
    base_model_name_or_path: str | None = None


class InstanceState(StrEnum):
    PENDING = "Pending"
    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"


class AdapterInstance(K8sModel):
    """The adapter on one pod, as that pod reported it."""

    pod: str
    state: InstanceState
    loaded_at: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
    attempts: int = 0
    last_error: str | None = None
    error_type: str | None = Field(default=None, description="The engine's error type for last_error.")
    next_attempt_at: str | None = Field(
        default=None, json_schema_extra={"format": "date-time"}, description="Backoff after failures."
    )


class TokenUsage(K8sModel):
    prompt: int = 0
    generated: int = 0


class LoraAdapterStatus(K8sModel):
    observed_generation: int | None = None
    phase: LoraPhase | None = None
    conditions: list[Condition] = list_map("type")
    served_name: str | None = None
    resolved: ResolvedAdapter | None = None
    desired_replicas: int = 0
    ready_replicas: int = 0
    instances: list[AdapterInstance] = list_map("pod")
    tokens: TokenUsage | None = Field(default=None, description="Tokens served, summed over pods.")


# CEL rules for real clusters; on older API servers the operator refuses the change with a condition.
BASE_MODEL_VALIDATIONS = [{"rule": "self == oldSelf", "message": "spec.baseModel is immutable"}]
