"""What every benchmark script reports the same way: copy bandwidth, Markdown tables, commit."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name, as the CPU benchmark reports record it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write of 1 GiB): the floor's yardstick."""
    import triton.testing

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def markdown_table(rows: list[dict], empty: str = "") -> str:
    """Rows of equal keys as a Markdown table; `empty` when there are none."""
    if not rows:
        return empty
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row[key]) for key in keys) + " |" for row in rows]
    return "\n".join(lines)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def load_average() -> list[float]:
    """The machine's 1/5/15-minute load averages, recorded with CPU results (a 2-core machine
    shared with other jobs disturbs absolute figures; per-round ratios much less)."""
    return [round(x, 2) for x in os.getloadavg()]


def load_note(loads: list[float] | None) -> str:
    if not loads:
        return "Load average not recorded."
    return (
        f"Load average when written: {loads[0]} / {loads[1]} / {loads[2]} (1/5/15 min); other jobs on "
        "the CPU disturb absolute figures, ratios are per round."
    )
