"""The CRDs in crds/ are generated from the pydantic models, structural, and current."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from loraplex.operator import bmd as bmd_crd
from loraplex.operator import crdgen
from loraplex.operator.bmd import BaseModelDeploymentSpec
from loraplex.operator.lora import LoraAdapterSpec
from loraplex.operator.structural import structural_schema, violations


def _schema(crd: dict) -> dict:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _walk_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {key for value in node.values() for key in _walk_keys(value)}
    if isinstance(node, list):
        return {key for value in node for key in _walk_keys(value)}
    return set()


def test_checked_in_crds_are_current() -> None:
    assert crdgen.stale_files() == [], "run `python -m loraplex.operator.crdgen`"


def test_checked_in_files_parse_back_to_the_generated_documents() -> None:
    for name, crd in crdgen.all_crds().items():
        assert yaml.safe_load((crdgen.CRD_DIR / name).read_text()) == crd


@pytest.mark.parametrize("cel", [True, False])
def test_schemas_are_structural(cel: bool) -> None:
    for crd in crdgen.all_crds(cel=cel).values():
        schema = _schema(crd)
        assert violations(schema) == []
        assert not {"$ref", "$defs", "title", "const"} & _walk_keys(schema)


def test_checker_finds_what_pydantic_emits_unconverted() -> None:
    raw = BaseModelDeploymentSpec.model_json_schema(by_alias=True)
    found = violations(raw)
    assert any("$defs" in line for line in found)
    assert any("anyOf outside int-or-string" in line for line in found)
    assert violations({"type": "number", "exclusiveMinimum": 0}) == [
        "<root>: exclusiveMinimum must be a boolean"
    ]
    assert violations({"properties": {"a": {"type": "object", "uniqueItems": True}}}) == [
        "<root>: no type",
        ".a: uniqueItems true is not allowed",
    ]


def test_unions_other_than_optional_are_refused() -> None:
    class Ambiguous(BaseModel):
        value: int | bool

    with pytest.raises(ValueError, match="structural"):
        structural_schema(Ambiguous)


def test_only_free_form_maps_preserve_unknown_fields() -> None:
    schema = structural_schema(BaseModelDeploymentSpec)
    node_selector = schema["properties"]["scheduling"]["properties"]["nodeSelector"]
    assert node_selector == {"type": "object", "additionalProperties": {"type": "string"}}
    assert "x-kubernetes-preserve-unknown-fields" not in _walk_keys(schema)


def test_defaults_enums_and_bounds_reach_the_spec_schema() -> None:
    spec = _schema(crdgen.base_model_deployment_crd())["properties"]["spec"]
    engine = spec["properties"]["engine"]
    assert engine["default"] == {}  # so nested defaults apply when `engine` is left out
    assert engine["properties"]["maxLoras"] == {
        "description": "Adapters resident in GPU slots at once.",
        "type": "integer",
        "default": 8,
        "minimum": 1,
        "maximum": 256,
    }
    fraction = engine["properties"]["kvCacheMemoryFraction"]
    assert (fraction["minimum"], fraction["exclusiveMinimum"], fraction["maximum"]) == (0, True, 1)
    assert spec["properties"]["service"]["properties"]["type"]["enum"] == [
        "ClusterIP",
        "NodePort",
        "LoadBalancer",
    ]
    assert spec["properties"]["adapterNamespaces"]["properties"]["from"]["default"] == "Same"
    assert spec["required"] == ["model"]
    cpu = spec["properties"]["resources"]["properties"]["cpu"]
    assert cpu["x-kubernetes-int-or-string"] is True


def test_status_schemas_carry_no_defaults_and_key_their_lists() -> None:
    for crd in crdgen.all_crds().values():
        status = _schema(crd)["properties"]["status"]
        assert "default" not in _walk_keys(status)
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert conditions["items"]["required"] == ["type", "status"]


def test_bmd_subresources_columns_and_names() -> None:
    crd = crdgen.base_model_deployment_crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {
        "status": {},
        "scale": {
            "specReplicasPath": ".spec.replicas",
            "statusReplicasPath": ".status.replicas",
            "labelSelectorPath": ".status.selector",
        },
    }
    main_columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert main_columns == ["Model", "Ready", "Adapters", "Phase", "Accelerator", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["bmd"]
    assert crd["spec"]["names"]["categories"] == ["loraplex"]
    assert crd["metadata"]["name"] == "basemodeldeployments.loraplex.dev"
    status = _schema(crd)["properties"]["status"]["properties"]
    assert {
        "observedGeneration",
        "phase",
        "replicas",
        "readyReplicas",
        "selector",
        "adapters",
        "pods",
    } <= set(status)


def test_lora_columns_and_immutable_base_model() -> None:
    crd = crdgen.lora_adapter_crd()
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    main_columns = [c["name"] for c in version["additionalPrinterColumns"] if "priority" not in c]
    assert main_columns == ["Base", "Served-Name", "Ready", "Rank", "Phase", "Age"]
    assert crd["spec"]["names"]["shortNames"] == ["lora"]
    base_model = _schema(crd)["properties"]["spec"]["properties"]["baseModel"]
    assert base_model["x-kubernetes-validations"] == [
        {"rule": "self == oldSelf", "message": "spec.baseModel is immutable"}
    ]


def test_no_cel_variant_has_no_validation_rules() -> None:
    for crd in crdgen.all_crds(cel=False).values():
        assert "x-kubernetes-validations" not in _walk_keys(crd)
    assert "x-kubernetes-validations" in _walk_keys(crdgen.base_model_deployment_crd())


def test_check_flag_reports_stale_folder_then_clean_after_write(tmp_path, capsys) -> None:
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 1
    assert "stale" in capsys.readouterr().err
    assert crdgen.main(["--out", str(tmp_path), "--no-cel"]) == 0
    assert crdgen.main(["--check", "--out", str(tmp_path), "--no-cel"]) == 0
    assert crdgen.main(["--check", "--out", str(tmp_path)]) == 1  # CEL variant differs


def test_minimal_specs_validate_with_defaults() -> None:
    bmd = BaseModelDeploymentSpec.model_validate({"model": {"id": "google/gemma-2-2b-it"}})
    assert (bmd.replicas, bmd.engine.max_loras, bmd.readiness_gate, bmd.accelerator) == (1, 8, True, None)
    lora = LoraAdapterSpec.model_validate({"baseModel": {"name": "gemma"}, "source": {"uri": "hf://a/b"}})
    assert lora.to_k8s() == {
        "baseModel": {"name": "gemma"},
        "source": {"uri": "hf://a/b"},
        "aliases": [],
        "pinned": False,
        "deletionPolicy": "Unload",
    }


def test_quantities_accept_integers_and_bad_values_are_refused() -> None:
    spec = BaseModelDeploymentSpec.model_validate({"model": {"id": "m"}, "resources": {"cpu": 4}})
    assert spec.resources.cpu == "4"
    with pytest.raises(ValidationError):
        BaseModelDeploymentSpec.model_validate({"model": {"id": "m"}, "engine": {"maxLoras": 0}})
    with pytest.raises(ValidationError):
        LoraAdapterSpec.model_validate(
            {"baseModel": {"name": "g"}, "source": {"uri": "x"}, "servedName": "a/b"}
        )


def test_cel_rules_are_also_enforced_by_the_models() -> None:
    """API servers without CEL (the local 1.20) accept these; the operator refuses them."""
    base = {"model": {"id": "m"}}
    invalid = [
        {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
        {"adapterNamespaces": {"from": "Selector"}},
        {"routing": {"inferencePool": {"enabled": True}}},
        {"accelerator": {"type": "nvidia-l4", "count": 2}},
    ]
    for spec in invalid:
        with pytest.raises(ValidationError):
            BaseModelDeploymentSpec.model_validate({**base, **spec})
    assert len(bmd_crd.SPEC_VALIDATIONS) == len(invalid)  # one model check per CEL rule


def test_one_accelerator_per_pod_until_the_engine_uses_more() -> None:
    """What the CRD accepts, the system does: count > 1 would be billed and left idle."""
    spec = BaseModelDeploymentSpec.model_validate(
        {"model": {"id": "m"}, "accelerator": {"type": "nvidia-l4"}}
    )
    assert spec.accelerator is not None and spec.accelerator.count == 1
    with pytest.raises(ValidationError, match="one device per pod"):
        BaseModelDeploymentSpec.model_validate(
            {"model": {"id": "m"}, "accelerator": {"type": "nvidia-l4", "count": 4}}
        )
    rules = crdgen.base_model_deployment_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"][
        "properties"
    ]["spec"]["x-kubernetes-validations"]
    assert {
        "rule": "!has(self.accelerator) || self.accelerator.count <= 1",
        "message": bmd_crd.ACCELERATOR_COUNT_MESSAGE,
    } in rules
