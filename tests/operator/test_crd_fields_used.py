"""What the CRD accepts, the system does: every spec field of both CRDs is read by a renderer, the
admission/desired-set code or the engine options, or the test fails naming it.

The walk: every leaf of the CRDs' spec schemas must appear in a full example object; then the
operator's pure functions run on it with attribute reads of the pydantic models recorded (and a
whole-model dump counts as reading all of it). A field read from the raw body instead (kopf
filters) is listed with the file and key that read it, and that file is checked for the key.
"""

from __future__ import annotations

import contextlib
import copy
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from loraplex.operator import autopilot, crdgen
from loraplex.operator.access import key_refs
from loraplex.operator.admission import admit, desired_set
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentSpec
from loraplex.operator.common import K8sModel
from loraplex.operator.credentials import credential_refs
from loraplex.operator.lora import LoraAdapterSpec
from loraplex.operator.render import (
    RenderOptions,
    build_configmap,
    build_deployment,
    build_hpa,
    build_inference_pool,
    build_pdb,
    build_scaled_object,
    build_service,
)

REPO = Path(__file__).resolve().parents[2]
SECRET_REF = {"name": "s", "key": "k"}
FULL_BMD_SPEC: dict[str, Any] = {
    "model": {"id": "gs://models/gemma", "revision": "17", "servedName": "gemma", "dtype": "bfloat16"},
    "hfTokenSecretRef": SECRET_REF,
    "replicas": 2,
    "image": "registry/loraplex-server:1",
    "imagePullPolicy": "Always",
    "serviceAccountName": "loraplex-reader",
    "accelerator": {"type": "nvidia-l4", "count": 1},
    "resources": {"cpu": "8", "memory": "32Gi", "ephemeralStorage": "100Gi"},
    "engine": {
        "maxLoras": 8,
        "maxCpuLoras": 32,
        "maxLoraRank": 16,
        "maxBatchTokens": 4096,
        "maxConcurrentRequests": 64,
        "maxInputTokens": 2048,
        "maxTotalTokens": 4096,
        "kvCacheMemoryFraction": 0.8,
        "cudaGraphs": False,
    },
    "scheduling": {
        "spot": True,
        "computeClass": "l4",
        "nodeSelector": {"team": "ml"},
        "tolerations": [
            {"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule", "tolerationSeconds": 5}
        ],
        "priorityClassName": "inference",
        "autopilot": True,
    },
    "service": {"type": "LoadBalancer", "port": 80},
    "apiKeySecretRef": SECRET_REF,
    "readinessGate": True,
    "adapterNamespaces": {
        "from": "Selector",
        "selector": {
            "matchLabels": {"llm": "on"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["a"]}],
        },
    },
    "autoscaling": {
        "minReplicas": 1,
        "maxReplicas": 4,
        "metric": "runningRequests",
        "target": 3.0,
        "scaleDownStabilizationSeconds": 60,
        "provider": "KEDA",
        "metricName": "vllm:num_requests_running",
        "serverAddress": "http://prometheus:9090",
    },
    "routing": {
        "inferencePool": {
            "enabled": True,
            "endpointPickerRef": {
                "name": "epp",
                "kind": "Service",
                "group": "",
                "port": 9002,
                "failureMode": "FailOpen",
            },
        }
    },
}
FULL_LORA_SPEC: dict[str, Any] = {
    "baseModel": {"name": "gemma", "namespace": "llm"},
    "source": {
        "uri": "s3://b/sql",
        "revision": "v1",
        "sha256": "a" * 64,
        "credentialsSecretRef": {"name": "aws"},
    },
    "servedName": "sql",
    "aliases": ["sql-v1"],
    "pinned": True,
    "deletionPolicy": "Orphan",
    "access": {"apiKeySecretRefs": [SECRET_REF]},
}
# Fields a kopf filter reads from the raw body (no model in between): (path, file, text it contains).
RAW_READS = {"LoraAdapter.deletionPolicy": ("operator/handlers.py", 'spec.get("deletionPolicy"')}


def _leaves(schema: dict[str, Any], prefix: str) -> set[str]:
    if "properties" in schema:
        return {leaf for key, sub in schema["properties"].items() for leaf in _leaves(sub, f"{prefix}.{key}")}
    if schema.get("type") == "array" and "properties" in schema.get("items", {}):
        return _leaves(schema["items"], f"{prefix}[]")
    return {prefix}


def _example_leaves(value: Any, prefix: str, schema: dict[str, Any]) -> set[str]:
    if isinstance(value, dict) and "properties" in schema:
        return {
            leaf
            for key, sub in value.items()
            for leaf in _example_leaves(sub, f"{prefix}.{key}", schema["properties"].get(key, {}))
        }
    if isinstance(value, list) and value and "properties" in schema.get("items", {}):
        return {leaf for item in value for leaf in _example_leaves(item, f"{prefix}[]", schema["items"])}
    return {prefix}


def _spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]


CRDS = {
    "BaseModelDeployment": (crdgen.base_model_deployment_crd(), FULL_BMD_SPEC, BaseModelDeploymentSpec),
    "LoraAdapter": (crdgen.lora_adapter_crd(), FULL_LORA_SPEC, LoraAdapterSpec),
}


def test_the_full_examples_set_every_spec_field() -> None:
    for kind, (crd, example, _) in CRDS.items():
        schema = _spec_schema(crd)
        missing = _leaves(schema, kind) - _example_leaves(example, kind, schema)
        assert not missing, f"add these to the full example of {kind}: {sorted(missing)}"


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (found := _model_of(arg)) is not None:
            return found
    return None


def _field_chain(model: type[BaseModel], path: list[str]) -> list[tuple[type[BaseModel], str]]:
    """`["engine", "maxLoras"]` -> [(Spec, "engine"), (EngineSpec, "max_loras")], by alias."""
    chain = []
    for segment in path:
        segment = segment.removesuffix("[]")
        name = next(n for n, f in model.model_fields.items() if (f.alias or n) == segment)
        chain.append((model, name))
        nested = _model_of(model.model_fields[name].annotation)
        if nested is None:
            break
        model = nested
    return chain


@contextlib.contextmanager
def _recording() -> Iterator[set[tuple[type, str]]]:
    reads: set[tuple[type, str]] = set()
    original_get, original_dump = K8sModel.__getattribute__, K8sModel.model_dump

    def traced_get(self: Any, name: str) -> Any:
        cls = type(self)
        if name in cls.model_fields:
            reads.add((cls, name))
        return original_get(self, name)

    def traced_dump(self: Any, *args: Any, **kwargs: Any) -> Any:
        _all_fields(type(self), reads)
        return original_dump(self, *args, **kwargs)

    K8sModel.__getattribute__, K8sModel.model_dump = traced_get, traced_dump
    try:
        yield reads
    finally:
        K8sModel.__getattribute__, K8sModel.model_dump = original_get, original_dump


def _all_fields(model: type[BaseModel], into: set[tuple[type, str]]) -> None:
    for name, info in model.model_fields.items():
        if (model, name) not in into:
            into.add((model, name))
            if (nested := _model_of(info.annotation)) is not None:
                _all_fields(nested, into)


def _run_the_operator(bmd_spec: dict[str, Any], lora_spec: dict[str, Any]) -> None:
    meta = {"name": "gemma", "namespace": "llm", "uid": "u", "generation": 1}
    bmd = BaseModelDeployment.from_body({"metadata": meta, "spec": bmd_spec})
    lora_meta = {
        "name": "sql",
        "namespace": "team",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "generation": 1,
    }
    lora = {"metadata": lora_meta, "spec": lora_spec}
    verdicts = admit(bmd, [lora], {"team": {"llm": "on", "tier": "a"}})
    assert [v.reason for v in verdicts] == ["Accepted"], verdicts
    options = RenderOptions()
    build_configmap(bmd, desired_set(verdicts).values())
    build_deployment(bmd, options)
    build_service(bmd)
    build_pdb(bmd, options)
    build_inference_pool(bmd)
    build_hpa(bmd)
    build_scaled_object(bmd)
    key_refs(verdicts, [lora])
    credential_refs(verdicts, [lora])
    autopilot.bmd_rejections(bmd)


def test_every_spec_field_is_read_by_the_system() -> None:
    hpa = copy.deepcopy(FULL_BMD_SPEC)
    hpa["autoscaling"] = {k: v for k, v in hpa["autoscaling"].items() if k != "serverAddress"} | {
        "provider": "HPA"
    }
    with _recording() as reads:
        _run_the_operator(FULL_BMD_SPEC, FULL_LORA_SPEC)
        _run_the_operator(hpa, FULL_LORA_SPEC)
    unread = []
    for kind, (crd, _, model) in CRDS.items():
        for leaf in sorted(_leaves(_spec_schema(crd), kind)):
            if leaf in RAW_READS:
                file, text = RAW_READS[leaf]
                assert text in (REPO / file).read_text(), f"{leaf}: {file} no longer reads it"
                continue
            chain = _field_chain(model, leaf.split(".")[1:])
            if not all(link in reads for link in chain):
                unread.append(leaf)
    assert not unread, f"accepted by the CRD, read by nothing (use or remove them): {unread}"


def test_the_walker_notices_an_unread_field() -> None:
    """The check itself can fail: dropping a renderer leaves its fields unread."""
    with _recording() as reads:
        meta = {"name": "gemma", "namespace": "llm", "uid": "u", "generation": 1}
        BaseModelDeployment.from_body({"metadata": meta, "spec": FULL_BMD_SPEC})
    chain = _field_chain(BaseModelDeploymentSpec, ["service", "port"])
    assert not all(link in reads for link in chain)
