"""bench/op_count.py end to end on one small layer per layout: counts per layer, outside, syncs."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.kernels.op_count import OpCounter

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def bench_ops():
    """bench/op_count.py as a module (as conftest's load_bench does; no shared fixture to edit)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("op_count")
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("layout", ["gemma-2-2b", "mistral-7b"])
def test_counts_one_decode_step_per_layer(bench_ops, layout, tmp_path, monkeypatch):
    for name, value in bench_ops.GPU_PATH_ENV.items():
        monkeypatch.setenv(name, value)
    runner = bench_ops.build_runner(layout, adapters=2, layers=2, real_widths=False, work=tmp_path)
    counter = bench_ops.count_step(runner, bench_ops.decode_batch(batch=3, adapters=2, context=20))
    assert isinstance(counter, OpCounter) and set(counter.scopes) == {"layer.0", "layer.1"}
    summary = bench_ops.summarise(layout, counter, runner.num_layers)
    assert summary["layers"] == 2
    assert 0 < summary["ops_per_layer_min"] == summary["ops_per_layer_max"]  # every layer alike
    # LoRA shrink + expand on 4 fused projections and the decode attention, at least
    assert summary["triton_per_layer_max"] >= 9
    assert summary["ops_total"] == 2 * summary["ops_per_layer_max"] + summary["ops_outside_layers"]
    assert sum(summary["layer_ops"].values()) == summary["ops_per_layer_max"]


def test_command_writes_its_report(tmp_path):
    out, md = tmp_path / "ops.json", tmp_path / "ops.md"
    command = [sys.executable, str(BENCH / "op_count.py"), "--layout", "mistral-7b", "--layers", "1",
               "--batch", "2", "--adapters", "1", "--sms", "4", "--json", str(out), "--markdown", str(md)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["env"]["sms"] == 4 and result["layouts"][0]["layers"] == 1
    assert result["layouts"][0]["ops_per_layer_max"] > 0
    assert "mistral-7b: device ops in one layer" in md.read_text()
