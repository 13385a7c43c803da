"""Types shared by both custom resources: the API group, references, conditions, quantities.

Every spec/status model derives from `K8sModel`: camelCase names on the wire, snake_case in
Python, frozen once validated (typed config at the edge, never mutated).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic.alias_generators import to_camel

GROUP = "loraplex.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class K8sModel(BaseModel):
    """Base of all CRD models. Unknown fields are ignored: the API server prunes them anyway,
    and an older operator must still read objects written under a newer CRD."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        frozen=True,
        extra="ignore",
        use_enum_values=False,
    )

    def to_k8s(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, unset optionals left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def section(cls: type[K8sModel], description: str | None = None) -> Any:
    """A sub-object that is always present: `default: {}` in the CRD makes the API server apply
    the nested defaults even when the user leaves the whole section out."""
    return Field(default_factory=cls, description=description, json_schema_extra={"default": {}})


def list_map(key: str, description: str | None = None) -> Any:
    """A list keyed by one field (x-kubernetes-list-type: map), so entries merge by key."""
    return Field(
        default_factory=list,
        description=description,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": [key]},
    )


def _quantity_to_str(value: Any) -> Any:
    return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value


# A Kubernetes resource quantity ("500m", "16Gi", 4): int-or-string on the wire, str in Python.
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    WithJsonSchema({"x-kubernetes-int-or-string": True, "anyOf": [{"type": "integer"}, {"type": "string"}]}),
]

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class SecretKeyRef(K8sModel):
    """One key of a Secret in the resource's namespace; only that key reaches the pod."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)
    key: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")


class LocalObjectReference(K8sModel):
    """An object in the resource's own namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN)


class SelectorOperator(StrEnum):
    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class LabelSelectorRequirement(K8sModel):
    key: str = Field(min_length=1)
    operator: SelectorOperator
    values: list[str] = Field(default_factory=list)


class LabelSelector(K8sModel):
    """A standard Kubernetes label selector (both parts ANDed; empty selects everything)."""

    match_labels: dict[str, str] = Field(default_factory=dict)
    match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


class Condition(K8sModel):
    """A status condition keyed by `type` (metav1.Condition)."""

    type: str = Field(min_length=1, max_length=316)
    status: ConditionStatus
    reason: str = Field(default="", max_length=1024)
    message: str = Field(default="", max_length=32768)
    observed_generation: int | None = Field(default=None, ge=0)
    last_transition_time: str | None = Field(default=None, json_schema_extra={"format": "date-time"})
