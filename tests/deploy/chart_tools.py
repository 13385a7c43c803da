"""Shared by the deploy tests: render the chart with helm, check objects against the CRD schemas."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from loraplex.localcluster.binaries import find_binary

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "loraplex"
MANIFESTS = ROOT / "manifests"
CRDS = ROOT / "crds"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(find_binary("helm")), *args], capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"helm {' '.join(args)} failed: {result.stderr}")
    return result


def render(*values: str, namespace: str = "loraplex-system", hooks: bool = False) -> list[dict[str, Any]]:
    """`helm template` with `--set` values, as parsed documents (hooks only when asked)."""
    sets = [arg for value in values for arg in ("--set", value)]
    no_hooks = [] if hooks else ["--no-hooks"]
    text = helm("template", "loraplex", str(CHART), "--namespace", namespace, *no_hooks, *sets).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def find(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]


def crd_schemas() -> dict[str, dict[str, Any]]:
    """Kind -> openAPIV3Schema of our checked-in CRDs."""
    schemas = {}
    for path in CRDS.glob("*.yaml"):
        crd = yaml.safe_load(path.read_text())
        schemas[crd["spec"]["names"]["kind"]] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schemas


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Paths in `value` the schema does not declare (the API server would prune them silently)."""
    if isinstance(value, dict) and schema.get("type") == "object":
        if "properties" not in schema:
            extra = schema.get("additionalProperties")
            if isinstance(extra, dict):
                return [e for k, v in value.items() for e in unknown_fields(v, extra, f"{path}.{k}")]
            return []  # free-form object (metadata, or any value allowed)
        found = []
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{path}.{key}")
            else:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
        return found
    if isinstance(value, list) and "items" in schema:
        return [
            e for i, item in enumerate(value) for e in unknown_fields(item, schema["items"], f"{path}[{i}]")
        ]
    return []


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
