"""Operator wiring that needs no cluster: handler registration, finalizer policy, settings,
the daemon's wake-ups and the status it writes for a verdict."""

from __future__ import annotations

import argparse
import asyncio
import time

import kopf
import pytest

from loraplex.operator import handlers, main
from loraplex.operator.admission import Verdict
from loraplex.operator.common import ConditionStatus
from loraplex.operator.conditions import find
from loraplex.operator.cycle import CycleResult
from loraplex.operator.daemon import Wakers, lora_verdict_status
from loraplex.operator.desired import DesiredAdapter
from loraplex.operator.engine_client import AdapterReport
from loraplex.operator.lora import LoraAdapterStatus, LoraPhase
from loraplex.operator.pods import PodObservation
from loraplex.operator.settings import OperatorConfig


def test_handlers_are_registered() -> None:
    registry = kopf.get_default_registry()
    changing = {(h.id, h.reason) for h in registry._changing.get_all_handlers()}
    assert {
        ("apply_children", "create"),
        ("adapter_changed", "update"),
        ("adapter_deleted", "delete"),
    } <= changing
    assert {h.id for h in registry._spawning.get_all_handlers()} >= {"converge"}
    assert {h.id for h in registry._indexing.get_all_handlers()} >= {"server_pods", "adapters_by_base"}
    finalizing = {h.id for h in registry._changing.get_all_handlers() if h.requires_finalizer}
    assert finalizing == {"adapter_deleted"}  # deleting a base never waits on the operator


def test_only_unload_policy_takes_a_finalizer() -> None:
    assert handlers._unloads_on_delete(spec={})
    assert handlers._unloads_on_delete(spec={"deletionPolicy": "Unload"})
    assert not handlers._unloads_on_delete(spec={"deletionPolicy": "Orphan"})


def test_config_from_env() -> None:
    config = OperatorConfig.from_env({"LORAPLEX_SERVER_IMAGE": "img:1", "LORAPLEX_LOAD_TIMEOUT": "90"})
    assert (config.server_image, config.timeouts.load_s, config.tick_s) == ("img:1", 90.0, 30.0)
    assert config.render_options("policy/v1beta1").pdb_api_version == "policy/v1beta1"


async def test_wake_cuts_the_sleep_short() -> None:
    wakers = Wakers()
    started = time.monotonic()
    sleeper = asyncio.create_task(wakers.sleep(("llm", "gemma"), 5.0))
    await asyncio.sleep(0.05)
    wakers.wake(("llm", "gemma"))
    await sleeper
    assert time.monotonic() - started < 1.0
    started = time.monotonic()
    await wakers.sleep(("llm", "gemma"), 0.05)  # the event was cleared: a full (short) sleep
    assert time.monotonic() - started >= 0.04


def test_verdict_status_for_refused_and_accepted_adapters() -> None:
    pods = [PodObservation(name="a", running=True, epoch="e").with_reports([])]
    result = CycleResult(pods=pods, attempts={}, acted=False)
    refused = Verdict("team-b", "x", False, "NotAllowed", "namespace team-b is not admitted", generation=3)
    status = lora_verdict_status(refused, result, LoraAdapterStatus(), now=1e9)
    accepted_condition = find(status.conditions, "Accepted")
    assert (status.phase, accepted_condition.status, accepted_condition.reason) == (
        LoraPhase.PENDING,
        ConditionStatus.FALSE,
        "NotAllowed",
    )
    adapter = DesiredAdapter(name="sql", source="hf://org/sql")
    loaded = [
        PodObservation(name="a", running=True, epoch="e").with_reports(
            [AdapterReport(name="sql", source="hf://org/sql", state="ready")]
        )
    ]
    accepted = Verdict("llm", "sql", True, "Accepted", "attached", adapter, generation=2)
    status = lora_verdict_status(accepted, CycleResult(loaded, {}, False), LoraAdapterStatus(), now=1e9)
    assert status.phase == LoraPhase.READY
    assert {c.type for c in status.conditions} == {"Accepted", "Loaded", "Ready"}


def test_operator_command_line_scopes() -> None:
    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    assert parser.parse_args(["-n", "llm", "-n", "team-a"]).namespace == ["llm", "team-a"]
    assert parser.parse_args([]).namespace == []  # cluster-wide by default
    assert parser.parse_args([]).liveness == "http://0.0.0.0:8080/healthz"
    with pytest.raises(SystemExit):
        parser.parse_args(["-n", "llm", "--all-namespaces"])
