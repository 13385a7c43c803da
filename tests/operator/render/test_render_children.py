"""Service, InferencePool, PodDisruptionBudget and adapter ConfigMap rendering."""

from __future__ import annotations

import json

from loraplex.operator.desired import DesiredAdapter, adapters_from_json
from loraplex.operator.render import (
    RenderOptions,
    build_configmap,
    build_deployment,
    build_inference_pool,
    build_pdb,
    build_service,
    label_selector_string,
    service_endpoint,
)

ADAPTERS = [
    DesiredAdapter(name="sql", source="hf://org/sql-lora", revision="abc", aliases=("text2sql",)),
    DesiredAdapter(name="chat", source="file:///data/chat", pinned=True, sha256="0" * 64),
]


def test_service_targets_the_named_container_port(bmd, make_bmd) -> None:
    service = build_service(make_bmd(service={"type": "LoadBalancer", "port": 80}))
    assert service["spec"]["type"] == "LoadBalancer"
    assert service["spec"]["ports"][0]["port"] == 80
    assert service["spec"]["ports"][0]["targetPort"] == "http"
    deployment = build_deployment(bmd, RenderOptions())
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service_endpoint(bmd) == "http://gemma.llm.svc:8080"


def test_selector_string_matches_rendered_selector(bmd) -> None:
    labels = build_service(bmd)["spec"]["selector"]
    assert dict(pair.split("=") for pair in label_selector_string(bmd).split(",")) == labels


def test_inference_pool_only_when_enabled(bmd, make_bmd) -> None:
    assert build_inference_pool(bmd) is None
    enabled = make_bmd(routing={"inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp"}}})
    pool = build_inference_pool(enabled)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"] == {"matchLabels": build_service(bmd)["spec"]["selector"]}
    assert pool["spec"]["targetPorts"] == [{"number": 8080}]
    assert pool["spec"]["endpointPickerRef"] == {
        "group": "",
        "kind": "Service",
        "name": "epp",
        "port": {"number": 9002},
        "failureMode": "FailClose",
    }
    assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-1"


def test_pdb_versions(bmd) -> None:
    modern = build_pdb(bmd, RenderOptions())
    assert modern["apiVersion"] == "policy/v1"
    assert modern["spec"]["maxUnavailable"] == 1
    assert modern["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
    legacy = build_pdb(bmd, RenderOptions(pdb_api_version="policy/v1beta1"))
    assert legacy["apiVersion"] == "policy/v1beta1"
    assert "unhealthyPodEvictionPolicy" not in legacy["spec"]  # unknown to old API servers


def test_configmap_holds_sorted_adapter_list_that_round_trips(bmd) -> None:
    configmap = build_configmap(bmd, ADAPTERS)
    assert configmap["metadata"]["name"] == "gemma-adapters"
    text = configmap["data"]["adapters.json"]
    assert [entry["name"] for entry in json.loads(text)] == ["chat", "sql"]
    assert json.loads(text)[1] == {
        "name": "sql",
        "source": "hf://org/sql-lora",
        "revision": "abc",
        "sha256": None,
        "aliases": ["text2sql"],
        "pinned": False,
    }
    assert adapters_from_json(text) == sorted(ADAPTERS, key=lambda adapter: adapter.name)
    assert build_configmap(bmd, reversed(ADAPTERS)) == configmap  # order-independent: no spurious writes


def test_every_child_is_owned_and_labelled(make_bmd) -> None:
    enabled = make_bmd(routing={"inferencePool": {"enabled": True, "endpointPickerRef": {"name": "epp"}}})
    children = [
        build_deployment(enabled, RenderOptions()),
        build_service(enabled),
        build_configmap(enabled, ADAPTERS),
        build_pdb(enabled, RenderOptions()),
        build_inference_pool(enabled),
    ]
    for child in children:
        assert child["metadata"]["namespace"] == "llm"
        assert child["metadata"]["ownerReferences"][0]["controller"] is True
        assert child["metadata"]["labels"]["loraplex.dev/base-model"] == "gemma"
