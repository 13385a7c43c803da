"""Scheduling priority of the server's worker threads: the event loop first.

The event loop answers the probes and writes every stream's tokens; its work is short, but it
must get a CPU soon after it wakes. On a contended CPU (a pod at its CPU limit, a shared node)
the loop thread otherwise waits in the OS run queue behind the server's own busy threads:
`loraplex serve --loop-lag-log` showed most of each stall of the loop as run-queue time
(docs/benchmarks/hostile.md). The engine thread, the adapter readers and the tokenizer pool
lower their own priority (nice +10, or `LORAPLEX_WORKER_NICE`; Linux's per-thread nice value) so the kernel
hands the CPU to the loop first; with an idle CPU to spare, nothing changes. Lowering one's own
priority needs no privilege.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading

log = logging.getLogger(__name__)

DEFAULT_WORKER_NICE = 10


def worker_nice() -> int:
    """`LORAPLEX_WORKER_NICE` (0 turns it off; benchmarks compare both), else 10."""
    value = os.environ.get("LORAPLEX_WORKER_NICE", "")
    try:
        return max(0, min(19, int(value))) if value.strip() else DEFAULT_WORKER_NICE
    except ValueError:
        log.warning("LORAPLEX_WORKER_NICE=%r is not an integer; using %d", value, DEFAULT_WORKER_NICE)
        return DEFAULT_WORKER_NICE


def lower_thread_priority(increment: int | None = None) -> None:
    """Raise the calling thread's nice value by `increment` (default `worker_nice()`). Linux
    only: elsewhere a no-op, since PRIO_PROCESS there names a whole process."""
    increment = worker_nice() if increment is None else increment
    if sys.platform != "linux" or increment <= 0:
        return
    tid = threading.get_native_id()
    try:
        os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + increment)
    except OSError as exc:  # e.g. a seccomp profile that refuses it: keep running, at full priority
        log.warning("could not lower the priority of thread %s: %s", threading.current_thread().name, exc)


def started_pool(max_workers: int, name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A thread pool whose `max_workers` threads are already running, at lowered priority.

    ThreadPoolExecutor starts its threads on demand, and `Thread.start()` waits until the new
    thread runs: on a busy CPU that wait (seen at 120 ms) would fall on the event loop at the
    first requests. Starting them here, before the server listens, keeps it off the loop.
    """
    pool = concurrent.futures.ThreadPoolExecutor(
        max_workers, thread_name_prefix=name, initializer=lower_thread_priority
    )
    barrier = threading.Barrier(max_workers + 1, timeout=30.0)  # each job holds its thread
    for _ in range(max_workers):
        pool.submit(barrier.wait)
    try:
        barrier.wait()
    except threading.BrokenBarrierError:  # a thread never started: the pool starts them later
        log.warning("%s: worker threads did not all start within 30 s", name)
    return pool
