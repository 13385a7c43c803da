"""The CRDs' CEL rules (`x-kubernetes-validations`) compiled and run for real, the way an API
server of 1.25+ runs them: on the object after structural defaulting, each rule with `self`
bound to the node it sits on, transition rules (`oldSelf`) only on updates.

The evaluator is `common-expression-language` (cel-rust) from PyPI. Kubernetes adds extension
libraries (quantity, lists, regex...); a rule that calls one the evaluator lacks needs it in
`KUBERNETES_FUNCTIONS`. Our rules call none today, and a test keeps it that way knowingly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

import cel
from chart_tools import crd_schemas as _read_crd_schemas

# Kubernetes CEL extension functions the evaluator does not ship, implemented here when a rule
# needs one (name -> Python callable). None is needed by our rules.
KUBERNETES_FUNCTIONS: dict[str, Callable[..., Any]] = {}
# Operators and functions cel-rust implements natively that our rules use.
NATIVE = frozenset({"!_", "_==_", "_!=_", "_&&_", "_||_", "_<=_", "_<_", "_>=_", "_>_", "has", "size"})


@dataclass(frozen=True)
class Rule:
    kind: str
    path: tuple[str, ...]  # property names from the object's root to the node the rule sits on
    rule: str
    message: str

    @property
    def is_transition(self) -> bool:
        return "oldSelf" in program(self.rule).variables()

    @property
    def where(self) -> str:
        return ".".join(self.path) or "<root>"


@cache
def crd_schemas() -> dict[str, dict[str, Any]]:
    return _read_crd_schemas()


@cache
def program(source: str) -> cel.Program:
    return cel.compile(source)


def rules(kind: str) -> list[Rule]:
    """Every `x-kubernetes-validations` rule of our CRD for `kind`, with where it sits."""
    return list(_walk(kind, crd_schemas()[kind], ()))


def _walk(kind: str, schema: Mapping[str, Any], path: tuple[str, ...]) -> Iterator[Rule]:
    for item in schema.get("x-kubernetes-validations", ()):
        yield Rule(kind, path, item["rule"], item.get("message", item["rule"]))
    for name, sub in (schema.get("properties") or {}).items():
        yield from _walk(kind, sub, (*path, name))
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict) and "x-kubernetes-validations" in str(schema[key]):
            raise NotImplementedError(f"a rule below {'.'.join(path)}[{key}]: run it per element")


def apply_defaults(value: Any, schema: Mapping[str, Any]) -> Any:
    """Structural defaulting as the API server does it, a new value (nested defaults apply inside
    a defaulted `{}`)."""
    if isinstance(value, Mapping) and "properties" in schema:
        out = dict(value)
        for name, sub in schema["properties"].items():
            if name not in out and "default" in sub:
                out[name] = copy.deepcopy(sub["default"])
            if name in out:
                out[name] = apply_defaults(out[name], sub)
        return out
    if isinstance(value, list) and "items" in schema:
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


def _node(obj: Any, path: tuple[str, ...]) -> Any:
    for name in path:
        if not isinstance(obj, Mapping) or name not in obj:
            return None
        obj = obj[name]
    return obj


def evaluate(rule: Rule, new: Any, old: Any = None) -> bool:
    """Whether `rule` passes on the (defaulted) object `new`, an update from `old` when given.
    A rule whose node is absent is not run; a runtime error counts as a failure, as in Kubernetes."""
    here = _node(new, rule.path)
    if here is None:
        return True
    context: dict[str, Any] = {"self": here}
    if rule.is_transition:
        before = _node(old, rule.path) if old is not None else None
        if before is None:
            return True  # transition rules run on updates only
        context["oldSelf"] = before
    try:
        return program(rule.rule).execute(cel.Context(context, KUBERNETES_FUNCTIONS)) is True
    except Exception:
        return False


def failing(kind: str, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[Rule]:
    schema = crd_schemas()[kind]
    new = apply_defaults(obj, schema)
    before = apply_defaults(old, schema) if old is not None else None
    return [rule for rule in rules(kind) if not evaluate(rule, new, before)]


def cel_errors(kind: str, obj: Mapping[str, Any], old: Mapping[str, Any] | None = None) -> list[str]:
    return [f"{kind} {rule.where}: {rule.message}" for rule in failing(kind, obj, old)]
