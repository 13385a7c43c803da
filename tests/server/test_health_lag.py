"""The event-loop stall log (`loraplex serve --loop-lag-log`): a stall is recorded with where its
time went, from the kernel's per-thread scheduler statistics."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from loraplex.server.health_lag import LoopLagMonitor

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/task/*/schedstat")


async def _stall(monitor: LoopLagMonitor, block: Callable[[], None]) -> None:
    monitor.start()
    await asyncio.sleep(0.05)  # a few beats on time: nothing recorded
    block()
    await asyncio.sleep(0.05)
    monitor.stop()


def _entries(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@linux_only
def test_a_busy_callback_is_recorded_as_running(tmp_path: Path) -> None:
    monitor = LoopLagMonitor(tmp_path / "lag.jsonl")
    asyncio.run(_stall(monitor, lambda: _spin(0.15)))
    [entry] = [e for e in _entries(tmp_path / "lag.jsonl") if e["late_ms"] > 100]
    assert entry["late_ms"] < 1000
    # the loop thread was on a CPU, or runnable and waiting for one; never asleep
    assert entry["running_ms"] + entry["runqueue_ms"] > 100
    assert entry["running_ms"] > 20
    assert entry["blocked_ms"] < 40


@linux_only
def test_a_loop_asleep_is_recorded_as_blocked_and_other_threads_show(tmp_path: Path) -> None:
    import threading

    monitor = LoopLagMonitor(tmp_path / "lag.jsonl")
    done = threading.Event()

    def spin_until_done() -> None:  # alive for the whole stall, however slow the machine
        while not done.is_set():
            _spin(0.001)

    worker = threading.Thread(target=spin_until_done, name="spinner")
    worker.start()  # before the monitor: its CPU time is read at every beat

    def block() -> None:
        time.sleep(0.15)  # like waiting for the GIL: the loop thread neither runs nor waits for a CPU

    try:
        asyncio.run(_stall(monitor, block))
    finally:
        done.set()
        worker.join()
    [entry] = [e for e in _entries(tmp_path / "lag.jsonl") if e["late_ms"] > 100]
    assert entry["blocked_ms"] > 100
    assert entry["running_ms"] < 30
    assert entry["other_threads_running_ms"].get("spinner", 0) > 20


def test_beats_on_time_record_nothing(tmp_path: Path) -> None:
    monitor = LoopLagMonitor(tmp_path / "lag.jsonl", threshold_s=0.5)
    asyncio.run(_stall(monitor, lambda: None))
    assert _entries(tmp_path / "lag.jsonl") == []
    assert monitor.stalls == 0
