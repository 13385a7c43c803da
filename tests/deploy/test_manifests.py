"""The shipped custom objects (manifests/, the GKE guide's YAML) use only fields our CRDs declare
and parse with the operator's models: an API server before field validation prunes a misspelt
field silently, so a dry run alone would not catch it."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml
from chart_tools import MANIFESTS, ROOT, crd_schemas, documents, unknown_fields

from loraplex.operator.bmd import BaseModelDeploymentSpec
from loraplex.operator.lora import LoraAdapterSpec

GUIDE = ROOT / "docs" / "gke-autopilot.md"
MODELS = {"BaseModelDeployment": BaseModelDeploymentSpec, "LoraAdapter": LoraAdapterSpec}


def _guide_documents() -> list[dict[str, Any]]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def _custom_objects() -> list[tuple[str, dict[str, Any]]]:
    found = [
        (str(path.relative_to(ROOT)), doc)
        for path in sorted(MANIFESTS.rglob("*.yaml"))
        for doc in documents(path)
        if doc.get("apiVersion", "").startswith("loraplex.dev/")
    ]
    return found + [("docs/gke-autopilot.md", doc) for doc in _guide_documents() if doc["kind"] in MODELS]


OBJECTS = _custom_objects()


@pytest.mark.parametrize("source, doc", OBJECTS, ids=[f"{s}:{d['metadata']['name']}" for s, d in OBJECTS])
def test_custom_object_fields_are_declared(source: str, doc: dict[str, Any]) -> None:
    schema = crd_schemas()[doc["kind"]]
    assert unknown_fields(doc["spec"], schema["properties"]["spec"], "spec") == []
    MODELS[doc["kind"]].model_validate(doc["spec"])


def test_guide_shows_the_shipped_files() -> None:
    shipped = {
        (d["kind"], d["metadata"]["name"]): d
        for path in sorted((MANIFESTS / "gke-autopilot").glob("*.yaml"))
        for d in documents(path)
    }
    shown = [d for d in _guide_documents() if (d["kind"], d["metadata"]["name"]) in shipped]
    assert len(shown) == 2  # the base and the adapter added live
    for doc in shown:
        assert doc == shipped[(doc["kind"], doc["metadata"]["name"])]


def test_unknown_field_checker_finds_misspellings() -> None:
    schema = crd_schemas()["BaseModelDeployment"]["properties"]["spec"]
    spec = {"model": {"id": "m", "dType": "x"}, "scheduling": {"tolerations": [{"keys": "a"}]}, "replica": 1}
    assert unknown_fields(spec, schema, "spec") == [
        "spec.model.dType",
        "spec.scheduling.tolerations[0].keys",
        "spec.replica",
    ]


def test_gke_example_is_the_seed_deployment() -> None:
    folder = MANIFESTS / "gke-autopilot"
    docs = [doc for path in sorted(folder.rglob("*.yaml")) for doc in documents(path)]
    (base,) = [d for d in docs if d["kind"] == "BaseModelDeployment"]
    assert base["spec"]["model"]["id"] == "google/gemma-2-2b-it"
    assert base["spec"]["accelerator"] == {"type": "nvidia-l4", "count": 1}
    assert base["spec"]["hfTokenSecretRef"]["name"] == "hf-token"
    sources = sorted(d["spec"]["source"]["uri"] for d in docs if d["kind"] == "LoraAdapter")
    assert sources == [
        f"google-cloud-partnership/gemma-2-2b-it-lora-{name}" for name in ("jap-en", "magicoder", "sql")
    ]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["stringData"]["token"] == "REPLACE_WITH_YOUR_HF_TOKEN"
    # The placeholder Secret sits one folder down: `kubectl apply -f manifests/gke-autopilot/` never sends it.
    assert not any(d["kind"] == "Secret" for path in folder.glob("*.yaml") for d in documents(path))
