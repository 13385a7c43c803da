"""Worker threads lower their own priority so the event loop gets a CPU first (Linux)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading

import pytest

from loraplex.server import app_priority
from loraplex.server.app_priority import lower_thread_priority, started_pool, worker_nice
from loraplex.server.routes.blocking import BlockingPool

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are Linux's")


def _own_nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def _nice_in_thread(fn) -> int:
    result: list[int] = []

    def run() -> None:
        fn()
        result.append(_own_nice())

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return result[0]


def test_only_the_calling_thread_is_lowered() -> None:
    before = _own_nice()
    lowered = _nice_in_thread(lambda: lower_thread_priority(3))
    assert lowered == min(19, before + 3)
    assert _own_nice() == before  # the caller (the event loop's thread) keeps its priority


def test_the_tokenizer_pool_runs_lowered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_WORKER_NICE", raising=False)
    pool = BlockingPool(max_workers=1)
    try:
        nice = asyncio.run(pool.run(_own_nice))
    finally:
        pool.close()
    assert nice == min(19, _own_nice() + app_priority.DEFAULT_WORKER_NICE)


@pytest.mark.parametrize(("value", "expected"), [("0", 0), ("5", 5), ("99", 19), ("x", 10), ("", 10)])
def test_worker_nice_setting(monkeypatch: pytest.MonkeyPatch, value: str, expected: int) -> None:
    monkeypatch.setenv("LORAPLEX_WORKER_NICE", value)
    assert worker_nice() == expected


def test_zero_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_WORKER_NICE", "0")
    before = _own_nice()
    assert _nice_in_thread(lower_thread_priority) == before


def test_started_pool_threads_run_before_the_first_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAPLEX_WORKER_NICE", raising=False)
    pool = started_pool(3, "prestarted")
    try:
        threads = [t for t in threading.enumerate() if t.name.startswith("prestarted")]
        assert len(threads) == 3  # a later submit starts no thread (Thread.start() waits for it)
        nices = {os.getpriority(os.PRIO_PROCESS, t.native_id) for t in threads}
        assert nices == {min(19, _own_nice() + app_priority.DEFAULT_WORKER_NICE)}
        assert pool.submit(lambda: 7).result() == 7
    finally:
        pool.shutdown()
