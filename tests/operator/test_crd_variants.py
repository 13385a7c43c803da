"""The CRDs exactly as users install them: the chart (helm install, `--include-crds`) and the
kubectl bundle carry crds/ with its CEL rules; the no-CEL variant is only generated, in memory,
for the local 1.20 API server, from the same models, and differs only in the validation rules."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

from loraplex.localcluster.binaries import find_binary
from loraplex.operator import crdgen

ROOT = Path(__file__).resolve().parents[2]
RULES = "x-kubernetes-validations"


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON-like documents differ (a key on one side only counts as a difference)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            found
            for key in sorted(set(a) | set(b))
            for found in (
                _differences(a[key], b[key], f"{path}.{key}") if key in a and key in b else [f"{path}.{key}"]
            )
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [
            found
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for found in _differences(x, y, f"{path}[{i}]")
        ]
    return [] if a == b else [path]


def _checked_in() -> dict[str, dict[str, Any]]:
    return {path.name: yaml.safe_load(path.read_text()) for path in sorted(crdgen.CRD_DIR.glob("*.yaml"))}


def _ours(docs: list[Any]) -> dict[str, dict[str, Any]]:
    return {
        f"{doc['metadata']['name']}.yaml": doc
        for doc in docs
        if isinstance(doc, dict)
        and doc.get("kind") == "CustomResourceDefinition"
        and doc["metadata"]["name"].endswith(".loraplex.dev")
    }


def test_the_two_variants_differ_only_in_validation_rules() -> None:
    with_cel, without = crdgen.all_crds(), crdgen.all_crds(cel=False)
    assert set(with_cel) == set(without) == set(_checked_in())
    for name in with_cel:
        found = _differences(with_cel[name], without[name])
        assert found, f"{name}: the variants are identical (no rules?)"
        assert all(path.rsplit(".", 1)[-1] == RULES for path in found), found
    assert (
        len([p for n in with_cel for p in _differences(with_cel[n], without[n])]) == 2
    )  # spec, spec.baseModel


def test_a_difference_elsewhere_is_caught() -> None:
    with_cel, without = crdgen.all_crds(), crdgen.all_crds(cel=False)
    name = "loraadapters.loraplex.dev.yaml"
    without[name]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["required"] = []
    assert any(not path.endswith(RULES) for path in _differences(with_cel[name], without[name]))


def test_checked_in_crds_are_the_cel_variant() -> None:
    assert _checked_in() == crdgen.all_crds()
    assert all(RULES in yaml.safe_dump(doc) for doc in _checked_in().values())


def test_no_file_ships_the_no_cel_variant() -> None:
    """Only the local cluster's installer generates it (in memory); every CRD file we ship has rules."""
    shipped = [
        ROOT / "manifests" / "install.yaml",
        *sorted((ROOT / "helm" / "loraplex" / "crds").glob("*.yaml")),
    ]
    for path in shipped:
        for doc in _ours(list(yaml.safe_load_all(path.read_text()))).values():
            assert RULES in yaml.safe_dump(doc), path
    callers = [
        path.relative_to(ROOT).as_posix()
        for folder in ("operator", "server", "e2e", "loraplex", "manifests")
        for path in (ROOT / folder).rglob("*.py")
        if "cel=False" in path.read_text()
    ]
    assert callers == ["e2e/cluster/install.py"]


def test_install_bundle_carries_the_checked_in_crds() -> None:
    documents = list(yaml.safe_load_all((ROOT / "manifests" / "install.yaml").read_text()))
    assert _ours(documents) == _checked_in()


def test_helm_install_applies_the_checked_in_crds() -> None:
    helm = find_binary("helm")  # provisioned by e2e/cluster/provision.sh, as for tests/deploy
    chart = ROOT / "helm" / "loraplex"
    text = subprocess.run(
        [str(helm), "template", "loraplex", str(chart), "--include-crds"],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert _ours(list(yaml.safe_load_all(text))) == _checked_in()
    plain = subprocess.run(
        [str(helm), "template", "loraplex", str(chart)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert _ours(list(yaml.safe_load_all(plain))) == {}  # CRDs come from crds/, never a template
