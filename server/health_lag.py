"""Event-loop stall accounting: where the time went when the loop answered late.

A heartbeat on the loop fires every `period_s`. When it fires more than `threshold_s` late, the
interval since the previous beat is split, from Linux's per-thread scheduler statistics
(`/proc/self/task/<tid>/schedstat`: time on a CPU, time runnable but waiting for one), into:

- `running_ms`: the loop thread ran Python (a long callback, or many short ones);
- `runqueue_ms`: the loop thread was runnable but the OS gave its CPU to someone else;
- `blocked_ms`: neither: asleep in `epoll` (at most one period when the loop is idle) or waiting
  for the GIL, which another thread held.

and each other thread's CPU time over about the same interval (`others_window_ms`, read every
10 beats and at stalls) says who could have held the GIL. One
JSON line per stall goes to `path` (`loraplex serve --loop-lag-log PATH`, for benchmarks and
diagnosis; off by default: it reads /proc at every beat). Linux only: elsewhere it records lateness
alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path
from typing import IO

FULL_READ_EVERY = 10


_fds: dict[int, int] = {}  # tid -> open /proc fd: a re-read skips the path lookup (which stalls
# behind a process busy mapping memory: a 5.9M-token encoding made an open() take 100 ms)


def _schedstat(tid: int) -> tuple[int, int] | None:
    """(ns on a CPU, ns waiting on a run queue) of one thread of this process, or None."""
    try:
        fd = _fds.get(tid)
        if fd is None:
            fd = _fds[tid] = os.open(f"/proc/self/task/{tid}/schedstat", os.O_RDONLY)
        run_ns, wait_ns, _ = os.pread(fd, 128, 0).split()
    except (OSError, ValueError):
        if (fd := _fds.pop(tid, None)) is not None:
            os.close(fd)
        return None
    return int(run_ns), int(wait_ns)


class LoopLagMonitor:
    def __init__(self, path: Path, period_s: float = 0.005, threshold_s: float = 0.010) -> None:
        self.path = path
        self.period_s = period_s
        self.threshold_s = threshold_s
        self.stalls = 0
        self._out: IO[str] | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._loop_tid = 0
        self._last: tuple[float, dict[int, tuple[int, int]]] = (0.0, {})
        self._last_full = self._last
        self._beats = 0

    def start(self) -> None:
        """On the loop's thread."""
        self._out = open(self.path, "a", buffering=1)  # noqa: SIM115 (closed by stop())
        self._loop_tid = threading.get_native_id()
        self._last = self._last_full = (time.perf_counter(), self._threads())
        self._schedule()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        if self._out is not None:
            self._out.close()
            self._out = None

    def _schedule(self) -> None:
        self._expected = time.perf_counter() + self.period_s
        self._handle = asyncio.get_running_loop().call_later(self.period_s, self._beat)

    def _threads(self) -> dict[int, tuple[int, int]]:
        """Every thread of the process, Python's and native ones (torch's OpenMP pool)."""
        stats = {}
        try:
            tids = [int(name) for name in os.listdir("/proc/self/task")]
        except OSError:
            return stats
        for tid in tids:
            if (stat := _schedstat(tid)) is not None:
                stats[tid] = stat
        return stats

    def _beat(self) -> None:
        now = time.perf_counter()
        late = now - self._expected
        # The loop thread at every beat (the stall's interval starts at the beat before); all
        # threads only at stalls and every FULL_READ_EVERY beats, to keep the beat cheap.
        self._beats += 1
        full = late > self.threshold_s or self._beats % FULL_READ_EVERY == 0
        current = self._threads() if full else self._loop_only()
        if late > self.threshold_s:
            self._record(now, late, current)
        if full:
            self._last_full = (now, current)
        self._last = (now, current)
        self._schedule()

    def _loop_only(self) -> dict[int, tuple[int, int]]:
        stat = _schedstat(self._loop_tid)
        return {self._loop_tid: stat} if stat is not None else {}

    def _record(self, now: float, late: float, current: dict[int, tuple[int, int]]) -> None:
        previous_time, previous = self._last
        self.stalls += 1
        interval_ms = (now - previous_time) * 1000
        entry: dict[str, object] = {"t": time.time(), "late_ms": round(late * 1000, 1),
                                    "interval_ms": round(interval_ms, 1)}  # fmt: skip
        loop_now, loop_before = current.get(self._loop_tid), previous.get(self._loop_tid)
        if loop_now and loop_before:
            running = (loop_now[0] - loop_before[0]) / 1e6
            runqueue = (loop_now[1] - loop_before[1]) / 1e6
            entry |= {"running_ms": round(running, 1), "runqueue_ms": round(runqueue, 1),
                      "blocked_ms": round(interval_ms - running - runqueue, 1)}  # fmt: skip
            entry |= self._others(now, current)
        if self._out is not None:
            self._out.write(json.dumps(entry) + "\n")

    def _others(self, now: float, current: dict[int, tuple[int, int]]) -> dict[str, object]:
        """CPU time of the other threads since the last full read (this stall and a little before)."""
        since, previous = self._last_full
        names = {t.native_id: t.name for t in threading.enumerate()}  # the rest are native
        others = {
            names.get(tid, f"native-{tid}"): round((stat[0] - previous[tid][0]) / 1e6, 1)
            for tid, stat in current.items()
            if tid != self._loop_tid and tid in previous
        }
        return {
            "others_window_ms": round((now - since) * 1000, 1),
            "other_threads_running_ms": {k: v for k, v in others.items() if v >= 0.5},
        }
