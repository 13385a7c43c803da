"""Which LoraAdapters a base model takes (pure): namespace admission, served-name uniqueness,
the immutable base reference. The result is the desired set plus an Accepted verdict for each.

Namespaces are admitted the way Gateway API listeners admit routes (`spec.adapterNamespaces`:
Same, All, or a label Selector). Every accepted adapter answers to `<namespace>/<name>`; its
bare served name and aliases only when no older adapter (or the base) holds them. A clash
inside the base's own namespace is refused (NameConflict: rename it); a clash with another
namespace keeps the newcomer served under its qualified name only (Accepted, reason
NameConflict), so one team never blocks another.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from loraplex.operator.bmd import BaseModelDeployment, NamespacesFrom
from loraplex.operator.common import GROUP, LabelSelector
from loraplex.operator.desired import DesiredAdapter, desired_adapter
from loraplex.operator.lora import spec_of

# Set on first acceptance; the adapter stays attached to this base even if spec.baseModel is
# edited on an API server that does not enforce the CEL immutability rule.
ATTACHED_ANNOTATION = f"{GROUP}/attached-to"


@dataclass(frozen=True)
class Verdict:
    namespace: str
    name: str
    accepted: bool
    reason: str
    message: str
    adapter: DesiredAdapter | None = None  # set when accepted
    generation: int = 0


def base_key(body: Mapping[str, Any]) -> tuple[str, str] | None:
    """(namespace, name) of the base an adapter belongs to: the recorded attachment, else its spec."""
    meta = body.get("metadata", {})
    attached = (meta.get("annotations") or {}).get(ATTACHED_ANNOTATION)
    if attached and "/" in attached:
        namespace, name = attached.split("/", 1)
        return namespace, name
    base = (body.get("spec") or {}).get("baseModel") or {}
    if not base.get("name"):
        return None
    return base.get("namespace") or meta.get("namespace"), base["name"]


def namespace_admitted(bmd: BaseModelDeployment, namespace: str, labels: Mapping[str, str] | None) -> bool:
    rule = bmd.spec.adapter_namespaces
    if rule.from_ == NamespacesFrom.ALL:
        return True
    if rule.from_ == NamespacesFrom.SAME:
        return namespace == bmd.namespace
    return rule.selector is not None and labels is not None and selector_matches(rule.selector, labels)


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    if any(labels.get(key) != value for key, value in selector.match_labels.items()):
        return False
    checks = {
        "In": lambda key, values: labels.get(key) in values,
        "NotIn": lambda key, values: labels.get(key) not in values,
        "Exists": lambda key, _: key in labels,
        "DoesNotExist": lambda key, _: key not in labels,
    }
    return all(checks[item.operator.value](item.key, item.values) for item in selector.match_expressions)


def admit(
    bmd: BaseModelDeployment,
    adapters: Sequence[Mapping[str, Any]],
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> list[Verdict]:
    """A verdict per adapter body; the oldest adapter keeps a contested served name or alias."""
    verdicts: list[Verdict] = []
    taken: dict[str, str] = {bmd.served_name: f"base model {bmd.namespace}/{bmd.name}"}
    for body in sorted(adapters, key=_age):
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        verdict = _judge(bmd, body, namespace_labels.get(namespace), taken)
        if verdict.adapter is not None:
            for served in (verdict.adapter.name, *verdict.adapter.aliases):
                taken[served] = f"LoraAdapter {namespace}/{name}"
        verdicts.append(verdict)
    return verdicts


def _judge(
    bmd: BaseModelDeployment,
    body: Mapping[str, Any],
    labels: Mapping[str, str] | None,
    taken: Mapping[str, str],
) -> Verdict:
    meta = body["metadata"]
    namespace, name, generation = meta["namespace"], meta["name"], int(meta.get("generation", 0))

    def refuse(reason: str, message: str) -> Verdict:
        return Verdict(namespace, name, False, reason, message, generation=generation)

    try:
        spec = spec_of(body)
    except ValidationError as error:
        return refuse("InvalidSpec", str(error))
    requested = (spec.base_model.namespace or namespace, spec.base_model.name)
    if requested != (bmd.namespace, bmd.name):
        return refuse(
            "BaseModelImmutable", f"spec.baseModel changed; still attached to {bmd.namespace}/{bmd.name}"
        )
    if not namespace_admitted(bmd, namespace, labels):
        return refuse("NotAllowed", f"namespace {namespace} is not admitted by {bmd.namespace}/{bmd.name}")
    adapter = desired_adapter(spec.served_name or name, spec)
    contested = [served for served in (adapter.name, *adapter.aliases) if served in taken]
    if contested and namespace == bmd.namespace:
        # The platform's own namespace (or a team clashing with itself): the user must rename.
        served = contested[0]
        return refuse("NameConflict", f"served name {served!r} is already used by {taken[served]}")
    if meta.get("deletionTimestamp"):
        return refuse("Deleting", "being deleted: unloading from every pod")
    qualified = qualified_name(namespace, name)
    if contested:
        # Another namespace's adapter (or the base) came first: this one is still served, under
        # its always-unique qualified name; one team can never block another.
        served = contested[0]
        aliases = tuple(alias for alias in adapter.aliases if alias not in taken)
        adapter = adapter.model_copy(update={"name": qualified, "aliases": aliases})
        message = f"served only as {qualified!r}: {served!r} is already used by {taken[served]}"
        return Verdict(namespace, name, True, "NameConflict", message, adapter, generation)
    adapter = adapter.model_copy(update={"aliases": (*adapter.aliases, qualified)})
    return Verdict(
        namespace, name, True, "Accepted", f"attached to {bmd.namespace}/{bmd.name}", adapter, generation
    )


def qualified_name(namespace: str, name: str) -> str:
    """`<namespace>/<metadata.name>`: unique per base by construction (served names have no "/")."""
    return f"{namespace}/{name}"


def _age(body: Mapping[str, Any]) -> tuple[str, str, str]:
    meta = body["metadata"]
    return meta.get("creationTimestamp") or "", meta["namespace"], meta["name"]


def desired_set(verdicts: Sequence[Verdict]) -> dict[str, DesiredAdapter]:
    return {v.adapter.name: v.adapter for v in verdicts if v.accepted and v.adapter is not None}
