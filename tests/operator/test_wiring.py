"""Operator wiring that needs no cluster: handler registration, settings, the loop's wake-ups."""

from __future__ import annotations

import argparse
import asyncio
import time

import kopf
import pytest

from loraplex.operator import handlers, main  # noqa: F401 - handlers registers with kopf
from loraplex.operator.daemon import Wakers
from loraplex.operator.settings import OperatorConfig


def test_handlers_are_registered() -> None:
    registry = kopf.get_default_registry()
    changing = {(h.id, h.reason) for h in registry._changing.get_all_handlers()}
    assert {("apply_children", "create"), ("apply_children", "update")} <= changing
    # LoraAdapters: an event wakes their base, no kopf change handler (no per-object annotations)
    assert {h.id for h in registry._watching.get_all_handlers()} >= {"adapter_event", "pod_changed"}
    assert not any("adapter" in h.id for h in registry._changing.get_all_handlers())
    assert {h.id for h in registry._spawning.get_all_handlers()} >= {"converge"}
    indexes = {h.id for h in registry._indexing.get_all_handlers()}
    assert indexes >= {"server_pods", "adapters_by_base", "bases", "namespace_labels"}
    finalizing = {h.id for h in registry._changing.get_all_handlers() if h.requires_finalizer}
    assert finalizing == set()  # deleting a base never waits on a change handler


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


async def test_a_wake_waits_its_debounce_unless_a_pod_changed() -> None:
    """A plain wake waits the debounce (the loop's last observation time); a pod's change cuts
    it short, also when it arrives during the debounce."""
    wakers, key = Wakers(), ("llm", "gemma")
    wakers.wake(key)
    sleeper = asyncio.create_task(wakers.sleep(key, 5.0, debounce_s=30.0))
    await asyncio.sleep(0.2)
    assert not sleeper.done()  # woken, still debouncing
    wakers.wake(key, urgent=True)
    await asyncio.wait_for(sleeper, timeout=5.0)
    wakers.wake(key, urgent=True)
    await asyncio.wait_for(wakers.sleep(key, 5.0, debounce_s=30.0), timeout=5.0)


def test_operator_command_line_scopes() -> None:
    parser = argparse.ArgumentParser()
    main.add_arguments(parser)
    assert parser.parse_args(["-n", "llm", "-n", "team-a"]).namespace == ["llm", "team-a"]
    assert parser.parse_args([]).namespace == []  # cluster-wide by default
    assert parser.parse_args([]).liveness == "http://0.0.0.0:8080/healthz"
    with pytest.raises(SystemExit):
        parser.parse_args(["-n", "llm", "--all-namespaces"])
