"""Autopilot's admission rules as a table: every pod we render for GKE is admitted unchanged, and
each rule refuses (or raises) what it should, by name."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.operator import autopilot
from loraplex.operator import bmd as bmd_crd
from loraplex.operator.autopilot import ACCELERATORS, GI, Effect, check, rejected_condition
from loraplex.operator.bmd import BaseModelDeployment, BaseModelDeploymentStatus
from loraplex.operator.render.deployment import build_pod_template
from loraplex.operator.render.meta import RenderOptions
from loraplex.operator.status import bmd_status

ROOT = Path(__file__).resolve().parents[2]
GKE_EXAMPLE = ROOT / "manifests" / "gke-autopilot" / "gemma-2-2b-it.yaml"
GUIDE = ROOT / "docs" / "gke-autopilot.md"


@pytest.fixture(autouse=True)
def _multi_device_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The rule table covers Autopilot's multi-GPU shapes too: checked as if the engine already
    used more than one device (today the CRD and the operator refuse accelerator.count > 1)."""
    monkeypatch.setattr(bmd_crd, "MAX_ACCELERATORS_PER_POD", 16)


def _bmd(spec: dict[str, Any], name: str = "gemma") -> BaseModelDeployment:
    body = {"metadata": {"name": name, "namespace": "llm", "uid": "u", "generation": 3}, "spec": spec}
    return BaseModelDeployment.from_body(body)


def _pod(spec: dict[str, Any]) -> dict[str, Any]:
    return build_pod_template(_bmd(spec), RenderOptions())


def _l4(**resources: Any) -> dict[str, Any]:
    return {
        "model": {"id": "google/gemma-2-2b-it"},
        "accelerator": {"type": "nvidia-l4", "count": 1},
        "resources": {"cpu": "4", "memory": "16Gi", "ephemeralStorage": "50Gi", **resources},
        "scheduling": {"autopilot": True},
    }


def _rules(pod: dict[str, Any]) -> dict[str, Effect]:
    return {item.rule: item.effect for item in check(pod)}


def _guide_bases() -> list[dict[str, Any]]:
    blocks = re.findall(r"^```yaml\n(.*?)^```", GUIDE.read_text(), flags=re.S | re.M)
    docs = [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]
    return [doc for doc in docs if doc.get("kind") == "BaseModelDeployment"]


def test_the_gke_example_and_the_guide_are_admitted_unchanged() -> None:
    example = yaml.safe_load(GKE_EXAMPLE.read_text())
    bases = [example, *_guide_bases()]
    assert len(bases) == 2
    for body in bases:
        assert body["spec"]["scheduling"]["autopilot"] is True
        pod = _pod(body["spec"])
        assert pod["spec"]["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert check(pod) == []
        assert rejected_condition(_bmd(body["spec"])) is None


def test_an_l4_pod_asking_more_cpu_than_the_node_has_is_rejected_by_name() -> None:
    pod = _pod(_l4(cpu="48"))
    (violation,) = check(pod)
    assert (violation.rule, violation.effect) == ("accelerator-cpu-max", Effect.REJECTED)
    assert "48" in violation.message and "31" in violation.message
    found = rejected_condition(_bmd(_l4(cpu="48")))
    assert found is not None
    assert (found.type, found.status.value, found.reason) == (
        "AutopilotRejected",
        "True",
        "AcceleratorCpuMax",
    )
    assert found.message.startswith("accelerator-cpu-max: 1 x nvidia-l4")


# (spec change, rule, effect): each row one rule of the table.
ROWS = [
    ({"resources": {"cpu": "31"}}, None, None),
    ({"resources": {"cpu": "32"}}, "accelerator-cpu-max", Effect.REJECTED),
    ({"resources": {"memory": "116Gi"}}, "accelerator-memory-max", Effect.REJECTED),
    ({"resources": {"ephemeralStorage": "200Gi"}}, "accelerator-ephemeral-storage-max", Effect.REJECTED),
    ({"resources": {"cpu": "250m"}}, "accelerator-cpu-min", Effect.CHANGED),
    ({"resources": {"memory": "512Mi"}}, "accelerator-memory-min", Effect.CHANGED),
    ({"accelerator": {"type": "nvidia-l4", "count": 3}}, "gpu-count", Effect.REJECTED),
    (
        {"accelerator": {"type": "nvidia-l4", "count": 2}, "resources": {"cpu": "24"}},
        "accelerator-cpu-max",
        Effect.REJECTED,
    ),
    ({"accelerator": {"type": "nvidia-l4", "count": 8}, "resources": {"cpu": "90"}}, None, None),
    (
        {"accelerator": {"type": "nvidia-tesla-a100", "count": 1}, "resources": {"cpu": "12"}},
        "accelerator-cpu-max",
        Effect.REJECTED,
    ),
    (
        {
            "accelerator": {"type": "nvidia-h100-80gb", "count": 8},
            "resources": {"cpu": "200", "memory": "1500Gi"},
        },
        None,
        None,
    ),
    ({"accelerator": {"type": "nvidia-b200", "count": 8}}, "accelerator-type", Effect.UNCHECKED),
    ({"scheduling": {"autopilot": True, "spot": True}}, None, None),
    ({"scheduling": {"autopilot": True, "computeClass": "Accelerator"}}, None, None),
    ({"scheduling": {"autopilot": True, "computeClass": "my-l4-class"}}, None, None),
    ({"scheduling": {"autopilot": True, "computeClass": "Balanced"}}, "compute-class", Effect.REJECTED),
    (
        {"scheduling": {"autopilot": True, "nodeSelector": {"cloud.google.com/gke-nodepool": "gpu"}}},
        "node-selector",
        Effect.REJECTED,
    ),
    ({"scheduling": {"autopilot": True, "nodeSelector": {"team": "a"}}}, "node-selector", Effect.REJECTED),
    (
        {
            "scheduling": {
                "autopilot": True,
                "nodeSelector": {"team": "a"},
                "tolerations": [{"key": "team", "operator": "Equal", "value": "a", "effect": "NoSchedule"}],
            }
        },
        None,
        None,
    ),
    (
        {"scheduling": {"autopilot": True, "nodeSelector": {"topology.kubernetes.io/zone": "us-central1-a"}}},
        None,
        None,
    ),
]


@pytest.mark.parametrize("change, rule, effect", ROWS, ids=[str(i) for i in range(len(ROWS))])
def test_rule_table(change: dict[str, Any], rule: str | None, effect: Effect | None) -> None:
    spec = _l4()
    for key, value in change.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and key in spec else value
    found = _rules(_pod(spec))
    assert found == ({} if rule is None else {rule: effect})


def test_forbidden_pod_features_are_rejected() -> None:
    pod = _pod(_l4())
    pod_spec = pod["spec"]
    bad = copy.deepcopy(pod)
    bad["spec"]["hostNetwork"] = True
    bad["spec"]["containers"][0]["securityContext"]["privileged"] = True
    bad["spec"]["containers"][0]["ports"][0]["hostPort"] = 8080
    bad["spec"]["volumes"].append({"name": "host", "hostPath": {"path": "/var/lib/kubelet"}})
    assert {rule for rule in _rules(bad)} == {"host-namespaces", "privileged", "host-port", "host-path"}
    logs = copy.deepcopy(pod)
    logs["spec"]["volumes"].append({"name": "logs", "hostPath": {"path": "/var/log/pods"}})
    logs["spec"]["containers"][0]["volumeMounts"].append(
        {"name": "logs", "mountPath": "/l", "readOnly": True}
    )
    assert check(logs) == []
    assert check(pod) == [] and pod_spec == pod["spec"]


def test_cpu_pods_follow_the_general_purpose_class() -> None:
    cpu = {"model": {"id": "m"}, "scheduling": {"autopilot": True}}
    assert check(_pod(cpu)) == []  # the operator's CPU defaults: 2 vCPU, 8Gi, 20Gi
    assert _rules(_pod({**cpu, "resources": {"cpu": "1", "memory": "16Gi"}})) == {
        "general-purpose-ratio": Effect.CHANGED
    }
    assert _rules(_pod({**cpu, "resources": {"cpu": "64", "memory": "64Gi"}})) == {
        "general-purpose-cpu-max": Effect.REJECTED
    }


# The largest Compute Engine machine that carries each (accelerator, count): vCPUs and GB of
# memory (G2, A2 High/Mega/Ultra, A3 High/Mega; N1 for T4). A pod can never get more than it.
MACHINES = {
    "nvidia-l4": {1: (32, 128), 2: (24, 96), 4: (48, 192), 8: (96, 384)},
    "nvidia-tesla-t4": {1: (48, 312), 2: (48, 312), 4: (96, 624)},
    "nvidia-tesla-a100": {1: (12, 85), 2: (24, 170), 4: (48, 340), 8: (96, 680), 16: (96, 1360)},
    "nvidia-a100-80gb": {1: (12, 170), 2: (24, 340), 4: (48, 680), 8: (96, 1360)},
    "nvidia-h100-80gb": {1: (26, 234), 2: (52, 468), 4: (104, 936), 8: (208, 1872)},
    "nvidia-h100-mega-80gb": {8: (208, 1872)},
}


def test_the_table_fits_inside_the_machines_it_stands_for() -> None:
    assert {name: set(shapes) for name, shapes in ACCELERATORS.items()} == {
        name: set(machines) for name, machines in MACHINES.items()
    }
    for accelerator, shapes in ACCELERATORS.items():
        for count, shape in shapes.items():
            vcpus, gigabytes = MACHINES[accelerator][count]
            assert shape.cpu.high < vcpus, (accelerator, count)
            assert shape.memory.high < gigabytes * GI, (
                accelerator,
                count,
            )  # Compute Engine's GB = 2^30 bytes
            for allowed in (shape.cpu, shape.memory, shape.ephemeral_storage):
                assert 0 < allowed.low < allowed.high
    assert autopilot.READ_ON == "2026-12-01" and set(autopilot.SOURCES) == {
        "resource-requests",
        "security",
        "gpus",
    }


def test_hardware_without_a_row_is_not_refused() -> None:
    spec = _l4()
    spec["accelerator"] = {"type": "nvidia-h200-141gb", "count": 8}
    assert [item.effect for item in check(_pod(spec))] == [Effect.UNCHECKED]
    assert rejected_condition(_bmd(spec)) is None


def test_rejections_are_reported_only_when_scheduling_says_autopilot() -> None:
    spec = _l4(cpu="48")
    spec["scheduling"] = {"autopilot": False}
    assert rejected_condition(_bmd(spec)) is None
    status = bmd_status(_bmd(_l4(cpu="48")), {}, [], BaseModelDeploymentStatus(), 0.0)
    (found,) = [item for item in status.conditions if item.type == "AutopilotRejected"]
    assert found.observed_generation == 3 and "accelerator-cpu-max" in found.message
    fixed = bmd_status(_bmd(_l4()), {}, [], status, 10.0)
    assert all(item.type != "AutopilotRejected" for item in fixed.conditions)
