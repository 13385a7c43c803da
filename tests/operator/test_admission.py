"""Which adapters a base takes: namespaces, served-name conflicts, immutable base, deletion."""

from __future__ import annotations

from typing import Any

from loraplex.operator.admission import ATTACHED_ANNOTATION, admit, base_key, desired_set
from loraplex.operator.bmd import BaseModelDeployment


def base(**spec: Any) -> BaseModelDeployment:
    body = {
        "metadata": {"name": "gemma", "namespace": "llm", "uid": "u"},
        "spec": {"model": {"id": "m"}, **spec},
    }
    return BaseModelDeployment.from_body(body)


def lora(
    name: str, namespace: str = "llm", created: str = "2026-01-01T00:00:00Z", **spec: Any
) -> dict[str, Any]:
    full = {"baseModel": {"name": "gemma", "namespace": "llm"}, "source": {"uri": f"hf://org/{name}"}, **spec}
    meta = {"name": name, "namespace": namespace, "creationTimestamp": created, "generation": 2}
    return {"metadata": meta, "spec": full}


def reasons(verdicts) -> dict[str, str]:
    return {f"{v.namespace}/{v.name}": v.reason for v in verdicts}


def test_same_namespace_by_default() -> None:
    verdicts = admit(base(), [lora("sql"), lora("chat", namespace="team-a")], {})
    assert reasons(verdicts) == {"llm/sql": "Accepted", "team-a/chat": "NotAllowed"}
    assert list(desired_set(verdicts)) == ["sql"]
    assert verdicts[0].generation == 2


def test_selector_and_all_admission() -> None:
    selector = {"from": "Selector", "selector": {"matchLabels": {"llm-access": "true"}}}
    labels = {"team-a": {"llm-access": "true"}, "team-b": {}}
    adapters = [lora("a", namespace="team-a"), lora("b", namespace="team-b")]
    assert reasons(admit(base(adapterNamespaces=selector), adapters, labels)) == {
        "team-a/a": "Accepted",
        "team-b/b": "NotAllowed",
    }
    expressions = {
        "from": "Selector",
        "selector": {"matchExpressions": [{"key": "llm-access", "operator": "Exists"}]},
    }
    assert reasons(admit(base(adapterNamespaces=expressions), adapters, labels))["team-a/a"] == "Accepted"
    assert set(reasons(admit(base(adapterNamespaces={"from": "All"}), adapters, {})).values()) == {"Accepted"}


def test_oldest_adapter_keeps_a_contested_name() -> None:
    older = lora("first", created="2026-01-01T00:00:00Z", servedName="shared")
    newer = lora("second", created="2026-02-01T00:00:00Z", aliases=["shared"])
    verdicts = admit(base(), [newer, older], {})
    assert reasons(verdicts) == {"llm/first": "Accepted", "llm/second": "NameConflict"}
    conflict = next(v for v in verdicts if not v.accepted)
    assert "LoraAdapter llm/first" in conflict.message
    assert list(desired_set(verdicts)) == ["shared"]


def test_base_served_name_is_reserved() -> None:
    (verdict,) = admit(base(), [lora("gemma")], {})
    assert verdict.reason == "NameConflict" and "base model" in verdict.message


def test_changed_base_reference_is_refused_and_deleting_adapters_drop_out() -> None:
    moved = lora("sql", baseModel={"name": "other"})
    moved["metadata"]["annotations"] = {ATTACHED_ANNOTATION: "llm/gemma"}
    deleting = lora("chat")
    deleting["metadata"]["deletionTimestamp"] = "2026-03-01T00:00:00Z"
    assert reasons(admit(base(), [moved, deleting], {})) == {
        "llm/sql": "BaseModelImmutable",
        "llm/chat": "Deleting",
    }


def test_invalid_spec_is_a_verdict_not_a_crash() -> None:
    broken = lora("bad")
    broken["spec"]["servedName"] = "has/slash"
    (verdict,) = admit(base(), [broken], {})
    assert (verdict.accepted, verdict.reason) == (False, "InvalidSpec")


def test_base_key_prefers_the_recorded_attachment() -> None:
    body = lora("sql", baseModel={"name": "other"})
    assert base_key(body) == ("llm", "other")
    body["metadata"]["annotations"] = {ATTACHED_ANNOTATION: "llm/gemma"}
    assert base_key(body) == ("llm", "gemma")
    implicit = {"metadata": {"name": "x", "namespace": "team"}, "spec": {"baseModel": {"name": "gemma"}}}
    assert base_key(implicit) == ("team", "gemma")
    assert base_key({"metadata": {"name": "x", "namespace": "team"}, "spec": {}}) is None
