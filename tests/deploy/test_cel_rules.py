"""Every CEL rule in crds/, compiled and run for real on a table of valid and invalid objects, and
the same table through the operator's own Python checks (what enforces the rules on API servers
without CEL, like the local 1.20 one). Both must agree on every row, so they cannot drift."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from cel_tools import NATIVE, apply_defaults, crd_schemas, failing, program, rules
from pydantic import ValidationError

from loraplex.operator.admission import ATTACHED_ANNOTATION, admit, base_key
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentSpec

NAMESPACE = "llm"
PICKER = {"name": "gemma-epp"}
KEDA = {"maxReplicas": 4, "provider": "KEDA", "serverAddress": "http://prometheus.monitoring:9090"}
SELECTOR = {"matchLabels": {"loraplex.dev/team": "a"}}

# Rule messages, to name which rule a row breaks.
AUTOSCALING = "autoscaling.minReplicas must not exceed autoscaling.maxReplicas, and provider KEDA needs autoscaling.serverAddress"
NAMESPACES = "adapterNamespaces.selector is required when from is Selector"
POOL = "routing.inferencePool.endpointPickerRef is required when the pool is enabled"
IMMUTABLE = "spec.baseModel is immutable"
ONE_DEVICE = "accelerator.count must be 1: the engine uses one device per pod (scale out with replicas)"


@dataclass(frozen=True)
class Row:
    id: str
    kind: str
    spec: dict[str, Any]
    breaks: frozenset[str] = frozenset()  # messages of the rules this row must fail
    old_spec: dict[str, Any] | None = None  # an update from this spec (transition rules)
    extra: dict[str, Any] = field(default_factory=dict)


def _bmd(**spec: Any) -> dict[str, Any]:
    return {"model": {"id": "google/gemma-2-2b-it"}, **spec}


def _lora(base: dict[str, Any]) -> dict[str, Any]:
    return {"baseModel": base, "source": {"uri": "hf://org/adapter"}}


BMD = "BaseModelDeployment"
LORA = "LoraAdapter"
TABLE = [
    Row("minimal", BMD, _bmd()),
    Row("hpa", BMD, _bmd(autoscaling={"minReplicas": 1, "maxReplicas": 4})),
    Row("hpa-equal-bounds", BMD, _bmd(autoscaling={"minReplicas": 3, "maxReplicas": 3})),
    Row(
        "hpa-min-over-max",
        BMD,
        _bmd(autoscaling={"minReplicas": 3, "maxReplicas": 2}),
        frozenset({AUTOSCALING}),
    ),
    Row("hpa-max-only", BMD, _bmd(autoscaling={"maxReplicas": 1})),  # minReplicas defaults to 1
    Row("keda", BMD, _bmd(autoscaling=KEDA)),
    Row(
        "keda-no-server",
        BMD,
        _bmd(autoscaling={"maxReplicas": 4, "provider": "KEDA"}),
        frozenset({AUTOSCALING}),
    ),
    Row("namespaces-same", BMD, _bmd(adapterNamespaces={"from": "Same"})),
    Row("namespaces-all", BMD, _bmd(adapterNamespaces={"from": "All"})),
    Row("namespaces-selector", BMD, _bmd(adapterNamespaces={"from": "Selector", "selector": SELECTOR})),
    Row(
        "namespaces-selector-missing",
        BMD,
        _bmd(adapterNamespaces={"from": "Selector"}),
        frozenset({NAMESPACES}),
    ),
    Row("pool-disabled", BMD, _bmd(routing={"inferencePool": {"enabled": False}})),
    Row("pool", BMD, _bmd(routing={"inferencePool": {"enabled": True, "endpointPickerRef": PICKER}})),
    Row("pool-no-picker", BMD, _bmd(routing={"inferencePool": {"enabled": True}}), frozenset({POOL})),
    Row(
        "all-three-broken",
        BMD,
        _bmd(
            autoscaling={"minReplicas": 5, "maxReplicas": 2},
            adapterNamespaces={"from": "Selector"},
            routing={"inferencePool": {"enabled": True}},
        ),
        frozenset({AUTOSCALING, NAMESPACES, POOL}),
    ),
    Row("one-gpu", BMD, _bmd(accelerator={"type": "nvidia-l4", "count": 1})),
    Row("gpu-count-defaulted", BMD, _bmd(accelerator={"type": "nvidia-l4"})),
    Row("two-gpus", BMD, _bmd(accelerator={"type": "nvidia-l4", "count": 2}), frozenset({ONE_DEVICE})),
    Row("lora-create", LORA, _lora({"name": "gemma"})),
    Row("lora-unchanged", LORA, _lora({"name": "gemma"}), old_spec=_lora({"name": "gemma"})),
    Row(
        "lora-same-namespace-kept",
        LORA,
        _lora({"name": "gemma", "namespace": "platform"}),
        old_spec=_lora({"name": "gemma", "namespace": "platform"}),
    ),
    Row(
        "lora-renamed-base",
        LORA,
        _lora({"name": "mistral"}),
        frozenset({IMMUTABLE}),
        _lora({"name": "gemma"}),
    ),
    Row(
        "lora-moved-namespace",
        LORA,
        _lora({"name": "gemma", "namespace": "team-b"}),
        frozenset({IMMUTABLE}),
        _lora({"name": "gemma", "namespace": "platform"}),
    ),
    Row(
        "lora-namespace-dropped",
        LORA,
        _lora({"name": "gemma"}),
        frozenset({IMMUTABLE}),
        _lora({"name": "gemma", "namespace": "platform"}),
    ),
]


def _object(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "loraplex.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": "row", "namespace": NAMESPACE},
        "spec": spec,
    }


def cel_verdict(row: Row) -> frozenset[str]:
    old = _object(row.kind, row.old_spec) if row.old_spec is not None else None
    return frozenset(rule.message for rule in failing(row.kind, _object(row.kind, row.spec), old))


def python_accepts(row: Row) -> bool:
    """The operator's own checks, on the object as the API server stores it (defaulted)."""
    stored = apply_defaults(_object(row.kind, row.spec), crd_schemas()[row.kind])
    if row.kind == BMD:
        try:
            BaseModelDeploymentSpec.model_validate(stored["spec"])
        except ValidationError:
            return False
        return True
    return _adapter_accepted(stored, row.old_spec)


def _adapter_accepted(stored: dict[str, Any], old_spec: dict[str, Any] | None) -> bool:
    """What the operator does with an adapter: it records the base it first attached to (the
    annotation) and refuses a later spec.baseModel that names another one (BaseModelImmutable)."""
    first = _object(LORA, old_spec if old_spec is not None else stored["spec"])
    namespace, name = base_key(first) or ("", "")
    stored["metadata"].update(
        annotations={ATTACHED_ANNOTATION: f"{namespace}/{name}"}, uid="u", creationTimestamp="t"
    )
    base = BaseModelDeployment.from_body(
        {
            "metadata": {"name": name, "namespace": namespace, "uid": "b"},
            "spec": _bmd(adapterNamespaces={"from": "All"}),
        }
    )
    (verdict,) = admit(base, [stored], {})
    return verdict.reason != "BaseModelImmutable"


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_cel_breaks_exactly_the_rules_the_row_names(row: Row) -> None:
    assert cel_verdict(row) == row.breaks


@pytest.mark.parametrize("row", TABLE, ids=[row.id for row in TABLE])
def test_python_checks_agree_with_cel(row: Row) -> None:
    assert python_accepts(row) == (not cel_verdict(row))


def test_every_rule_has_an_invalid_row_and_transition_rules_an_update_pair() -> None:
    every = [rule for kind in (BMD, LORA) for rule in rules(kind)]
    assert len(every) == 5  # a new rule in crds/ needs rows here
    for rule in every:
        broken = [row for row in TABLE if rule.message in row.breaks and row.kind == rule.kind]
        assert broken, f"no invalid example for {rule.rule!r}"
        if rule.is_transition:
            assert all(row.old_spec is not None for row in broken)
            assert any(row.old_spec is not None and not row.breaks for row in TABLE if row.kind == rule.kind)


def test_rules_compile_and_use_only_functions_we_can_evaluate() -> None:
    for kind in (BMD, LORA):
        for rule in rules(kind):
            used = set(program(rule.rule).functions())
            assert used <= NATIVE, f"{rule.rule!r} needs {used - NATIVE}: add it to KUBERNETES_FUNCTIONS"


def test_known_difference_explicit_own_namespace() -> None:
    """Writing out the namespace the reference already defaulted to is a change to CEL (`self ==
    oldSelf` compares the stored field) but not to the operator, which compares the base it
    resolves to: a CRD rule cannot see metadata.namespace. The API server refuses the edit; the
    operator would not have moved the adapter either. Not in the table because they differ."""
    row = Row(
        "explicit-own-namespace",
        LORA,
        _lora({"name": "gemma", "namespace": NAMESPACE}),
        old_spec=_lora({"name": "gemma"}),
    )
    assert cel_verdict(row) == {IMMUTABLE}
    assert python_accepts(row)
