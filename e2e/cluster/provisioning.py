"""Run `provision.sh` beside other work, so a cold `make demo` builds the control plane while
it installs Python packages and trains the demo models.

`provision.sh` holds a lock for its whole run and is idempotent: a second run waits for the
first, finds the binaries in the cache and returns in about a second. So `finish` simply runs it
in the foreground and, while it waits on the lock, relays what the background run writes to its
log.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

PROVISION_SH = Path(__file__).resolve().parent / "provision.sh"
LOG_ENV = "LORAPLEX_PROVISION_LOG"  # set by `make demo`, which starts the build before `make install`


class ProvisionFailed(RuntimeError):
    """provision.sh exited non-zero; the message holds the end of its output."""


class BackgroundProvision:
    """A provisioning run started earlier (by `make demo`) or now, whose log can be relayed."""

    def __init__(self, log: Path, process: subprocess.Popen[bytes] | None) -> None:
        self.log = log
        self._process = process

    @classmethod
    def start(cls, default_log: Path) -> BackgroundProvision:
        """Adopt the run `make demo` started (its log in $LORAPLEX_PROVISION_LOG), else start one."""
        adopted = os.environ.get(LOG_ENV)
        if adopted:
            return cls(Path(adopted), None)
        default_log.parent.mkdir(parents=True, exist_ok=True)
        with default_log.open("wb") as out:
            process = subprocess.Popen(
                ["bash", str(PROVISION_SH)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        return cls(default_log, process)

    def finish(self, report: Callable[[str], None], heartbeat_s: float = 30.0) -> None:
        """Wait until the binaries are in the cache, relaying the background run's log lines (and,
        when it writes none for `heartbeat_s`, a line saying how long it has been waiting)."""
        stop = threading.Event()
        relay = threading.Thread(target=self._relay, args=(report, stop, heartbeat_s), daemon=True)
        relay.start()
        try:
            result = subprocess.run(["bash", str(PROVISION_SH)], capture_output=True, text=True)
            if self._process is not None:
                self._process.wait()
        finally:
            stop.set()
            relay.join()
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
            raise ProvisionFailed(f"provision.sh failed (log: {self.log}):\n{tail}")
        for line in result.stderr.splitlines():
            if line.startswith("[provision") and "ready in" in line:
                report("  " + line)

    def _relay(self, report: Callable[[str], None], stop: threading.Event, heartbeat_s: float) -> None:
        """Print the log's `[provision ...]` lines as they are written (build output stays in the log)."""
        position, started = 0, time.monotonic()
        quiet_since = started
        while True:
            done = stop.wait(min(0.5, heartbeat_s))
            if not done and time.monotonic() - quiet_since >= heartbeat_s:
                waited = time.monotonic() - started
                report(f"  ... still provisioning, waited {waited:.0f}s so far (build output: {self.log})")
                quiet_since = time.monotonic()
            try:
                with self.log.open("rb") as handle:
                    handle.seek(position)
                    chunk = handle.read()
            except FileNotFoundError:
                chunk = b""
            complete, _, _ = chunk.rpartition(b"\n")
            if complete:
                position += len(complete) + 1
                for line in complete.decode(errors="replace").splitlines():
                    if line.startswith("[provision"):
                        report("  " + line)
                        quiet_since = time.monotonic()
            if done:
                return
