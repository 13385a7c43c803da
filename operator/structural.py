"""Pydantic JSON schema -> Kubernetes structural OpenAPI v3 schema, and a checker for the rules.

Pydantic emits JSON Schema 2020-12 (`$ref`/`$defs`, `anyOf` with null for optionals, numeric
`exclusiveMinimum`); apiextensions.k8s.io/v1 wants OpenAPI v3 "structural" schemas: every node
typed, no references, `anyOf` only for value validation, boolean exclusive bounds.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# Keys pydantic emits that CRD schemas either reject or do not need.
_DROPPED_KEYS = {"title", "examples", "discriminator"}
_NULL = {"type": "null"}
_INT_OR_STRING = "x-kubernetes-int-or-string"
_PRESERVE = "x-kubernetes-preserve-unknown-fields"
# Written first, in this order, so generated YAML reads top-down; the rest follows sorted.
_KEY_ORDER = ["description", "type", "format", "enum", "default", "minimum", "maximum", "required"]
_LAST_KEYS = ["properties", "items", "additionalProperties"]


def structural_schema(model: type[BaseModel], *, with_defaults: bool = True) -> dict[str, Any]:
    """The structural schema of `model` (by alias). `with_defaults=False` drops every default,
    as status schemas should: the operator, not the API server, writes status."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return _convert(raw, defs, with_defaults)


def _convert(node: dict[str, Any], defs: dict[str, Any], with_defaults: bool) -> dict[str, Any]:
    node = _resolve(node, defs)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "default" and (value is None or not with_defaults)):
            continue
        if key == "properties":
            out[key] = {name: _convert(sub, defs, with_defaults) for name, sub in value.items()}
        elif key == "items" or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = _convert(value, defs, with_defaults)
        elif key == "description":
            out[key] = " ".join(value.split())  # docstrings wrap; kubectl explain reflows anyway
        elif key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum") and not isinstance(value, bool):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        else:
            out[key] = value
    if out.get("additionalProperties") is True or (
        out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out
    ):
        # Free-form maps only: everything else is spelled out so the API server can prune.
        out.pop("additionalProperties", None)
        out[_PRESERVE] = True
    if out.get("additionalProperties") is False:
        out.pop("additionalProperties")
    return _ordered(out)


def _ordered(node: dict[str, Any]) -> dict[str, Any]:
    first = [key for key in _KEY_ORDER if key in node]
    last = [key for key in _LAST_KEYS if key in node]
    middle = sorted(set(node) - set(first) - set(last))
    return {key: node[key] for key in first + middle + last}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline `$ref` (siblings override the target) and collapse `anyOf [X, null]` into X."""
    while True:
        if "$ref" in node:
            target = defs[node["$ref"].rsplit("/", 1)[-1]]
            node = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        elif "anyOf" in node and not node.get(_INT_OR_STRING):
            options = [option for option in node["anyOf"] if option != _NULL]
            if len(options) != 1:
                raise ValueError(f"not expressible as a structural schema: anyOf {node['anyOf']}")
            rest = {k: v for k, v in node.items() if k != "anyOf"}
            node = {**options[0], **rest}
        else:
            return node


def violations(schema: dict[str, Any], path: str = "") -> list[str]:
    """Breaches of the structural-schema rules (empty when the schema is fine)."""
    found: list[str] = []
    where = path or "<root>"
    for key in ("$ref", "$defs", "definitions", "const", "oneOf", "allOf", "not", "title"):
        if key in schema:
            found.append(f"{where}: has {key}")
    if schema.get("uniqueItems") is True:
        found.append(f"{where}: uniqueItems true is not allowed")
    if "anyOf" in schema and not schema.get(_INT_OR_STRING):
        found.append(f"{where}: anyOf outside int-or-string")
    if "type" not in schema and not (schema.get(_INT_OR_STRING) or schema.get(_PRESERVE)):
        found.append(f"{where}: no type")
    if schema.get("type") == "null" or ("default" in schema and schema["default"] is None):
        found.append(f"{where}: null type or null default")
    if schema.get("default") == "":
        found.append(f"{where}: empty-string default (Kubernetes 1.20 reads it as null)")
    if "properties" in schema and "additionalProperties" in schema:
        found.append(f"{where}: properties and additionalProperties together")
    for key in ("exclusiveMinimum", "exclusiveMaximum"):
        if key in schema and not isinstance(schema[key], bool):
            found.append(f"{where}: {key} must be a boolean")
    for name, sub in schema.get("properties", {}).items():
        found += violations(sub, f"{path}.{name}")
    for key in ("items", "additionalProperties"):
        if isinstance(schema.get(key), dict):
            found += violations(schema[key], f"{path}[{key}]")
    return found
