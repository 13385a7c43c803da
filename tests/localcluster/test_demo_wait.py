"""The demo's wait, decided from what the cluster reports (no cluster: kubectl's JSON given);
the same logic against a real cluster, ten rounds: tests/e2e_local/test_demo_wait_envtest.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from loraplex.localcluster.demo_wait import NotServing, Observation, Target, wait_until_serving

TARGET = Target("demo", "tiny-llama", ("sql", "poem"), replicas=2)
READY = {"phase": "Ready", "readyReplicas": 2}
SERVING_BASE = {**READY, "observedGeneration": 3, "_generation": 3}
TWO = ("127.0.0.2:8080", "127.0.0.3:8080")


def test_serving_when_everything_is_there() -> None:
    assert Observation(SERVING_BASE, {"sql": READY, "poem": READY}, TWO).missing(TARGET) == []


def test_adapters_ready_while_the_base_still_loads_is_not_serving() -> None:
    """The flake `make demo` had: adapters said Ready 2/2, the base Loading 0/2, no endpoints."""
    base = {"phase": "Loading", "readyReplicas": 0, "observedGeneration": 3, "_generation": 3}
    missing = Observation(base, {"sql": READY, "poem": READY}, ()).missing(TARGET)
    assert missing == [
        "tiny-llama Ready 2/2 (is Loading 0/2)",
        "2 ready endpoints of Service tiny-llama (has 0)",
    ]


def test_a_status_of_an_older_generation_or_a_missing_adapter_is_not_serving() -> None:
    stale = {**SERVING_BASE, "observedGeneration": 2}
    assert Observation(stale, {"sql": READY, "poem": READY}, TWO).missing(TARGET) == [
        "tiny-llama Ready 2/2 (is Ready 2/2)"
    ]
    assert Observation(SERVING_BASE, {"sql": READY}, TWO).missing(TARGET) == [
        "adapter poem Ready 2/2 (is - 0/2)"
    ]


def test_a_model_that_does_not_answer_is_not_serving() -> None:
    refused = {"poem@127.0.0.3:8080": "HTTP 401"}
    observation = Observation(SERVING_BASE, {"sql": READY, "poem": READY}, TWO, refused)
    assert observation.missing(TARGET) == ["poem@127.0.0.3:8080 answering (got HTTP 401)"]


def _kubectl(bmd_status: dict[str, Any]) -> Any:
    def kubectl(*args: str) -> str:
        if "endpointslices" in args:
            return json.dumps({"items": []})
        bmd = {"kind": "BaseModelDeployment", "metadata": {"name": "tiny-llama", "generation": 1}}
        loras = [{"kind": "LoraAdapter", "metadata": {"name": n}, "status": READY} for n in TARGET.adapters]
        return json.dumps({"items": [{**bmd, "status": bmd_status}, *loras]})

    return kubectl


def test_the_timeout_names_what_it_waited_for() -> None:
    lines: list[str] = []
    loading = {"phase": "Loading", "readyReplicas": 0, "observedGeneration": 1}
    with pytest.raises(NotServing) as raised:
        wait_until_serving(_kubectl(loading), TARGET, timeout_s=0.2, report=lines.append, interval_s=0.05)
    message = str(raised.value)
    assert "tiny-llama Ready 2/2 (is Loading 0/2)" in message
    assert "2 ready endpoints of Service tiny-llama (has 0)" in message
    assert len(lines) == 1 and "tiny-llama: Loading 0/2 pods" in lines[0]  # printed once: no change
