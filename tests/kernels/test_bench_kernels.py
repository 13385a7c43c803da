"""bench/kernels.py: its byte model, its baselines and its behaviour without a GPU (CPU parts only)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kernels.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("loraplex_bench_kernels", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through sys.modules
    sys.path.insert(0, str(BENCH_DIR))  # the script imports its sibling benchutil.py
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.path.remove(str(BENCH_DIR))
        del sys.modules[spec.name]


def test_gemma_layer_shapes_and_bytes_match_the_design_figures(bench):
    groups = bench.layer_groups("gemma-2-2b")
    assert [(g.name, g.in_features, g.widths) for g in groups] == [
        ("qkv", 2304, (2048, 1024, 1024)),
        ("o", 2048, (2304,)),
        ("gate_up", 2304, (9216, 9216)),
        ("down", 9216, (2304,)),
    ]
    one = bench.layer_bytes(groups, bench.Point("gemma-2-2b", 1, 1, 16), 2)
    two = bench.layer_bytes(groups, bench.Point("gemma-2-2b", 1, 2, 16), 2)
    # DESIGN §9: a rank-16 adapter on all 7 projections of Gemma-2-2B's 26 layers is 41.5 MB
    assert round((two - one) * 26 / 1e6, 1) == 41.5
    headline = bench.layer_bytes(groups, bench.Point("gemma-2-2b", 32, 32, 16), 2)
    assert 17.5 < headline / 2.98e12 * 1e6 < 19.0  # DESIGN §6: a byte floor of about 17.9 µs on H100


def test_mistral_shapes(bench):
    groups = {g.name: g for g in bench.layer_groups("mistral-7b")}
    assert groups["qkv"].widths == (4096, 1024, 1024)
    assert groups["down"].in_features == 14336


def test_the_three_implementations_compute_the_same_thing(bench):
    point = bench.Point("gemma-2-2b", 5, 2, 8)
    outs = {}
    for name, step in (
        ("triton", bench.triton_step),
        ("reference", bench.reference_step),
        ("loop", bench.loop_step),
    ):
        torch.manual_seed(0)
        layer = bench.build_layer(bench.layer_groups("gemma-2-2b"), point, torch.float32, dev="cpu")
        step(layer)
        outs[name] = [t.out for t in layer.tensors]
    for name in ("triton", "loop"):
        for got, want in zip(outs[name], outs["reference"], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert any(bool(o.abs().sum() > 0) for o in outs["loop"])


def test_sweep_skips_more_adapters_than_tokens(bench):
    points = bench.sweep(
        bench.parse_args(["--models", "gemma-2-2b", "--tokens", "1,8", "--adapters", "1,8,32"])
    )
    assert {(p.tokens, p.adapters) for p in points} == {(1, 1), (8, 1), (8, 8)}


def test_without_a_gpu_it_says_so_and_writes_nothing(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    md, js = tmp_path / "k.md", tmp_path / "k.json"
    assert bench.main(["--quick", "--markdown", str(md), "--json", str(js)]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not md.exists() and not js.exists()


def test_reports_hold_the_headline_and_a_row_per_point(bench, tmp_path):
    headline = bench.Point("gemma-2-2b", 32, 32, 16)
    results = [
        bench.Result(headline, 55_000_000, {"triton": 30.0, "reference": 400.0, "loop": 900.0},
                     {"qkv": 8.0, "o": 4.0, "gate_up": 12.0, "down": 6.0}, 1e-3),
        bench.Result(bench.Point("mistral-7b", 8, 8, 64), 9_000_000, {"triton": 9.0, "reference": 50.0, "loop": 80.0},
                     {}, 2e-3),
    ]  # fmt: skip
    env = {"gpu": "Test GPU", "date": "2026-01-01 00:00 UTC", "torch": "x", "triton": "y", "dtype": "bfloat16",
           "copy_GBps": 3000}  # fmt: skip
    md, js = tmp_path / "kernels.md", tmp_path / "kernels.json"
    bench.write_reports(results, 3e12, env, js, md)
    text = md.read_text()
    assert "Test GPU" in text and "30.0 µs" in text and "61.1% of copy bandwidth" in text
    assert "30.0x the per-adapter loop" in text and ": met." in text
    assert len(json.loads(js.read_text())["rows"]) == 2


def test_measure_and_tune_run_end_to_end_with_a_stand_in_timer(bench, monkeypatch):
    calls = []

    def fake_timer(fn):
        fn()
        calls.append(fn)
        return float(len(calls))

    monkeypatch.setattr(bench, "time_graph", fake_timer)
    monkeypatch.setattr(bench, "SHRINK_TRIALS", [bench.ShrinkConfig(block_k=256, split_k=4)])
    monkeypatch.setattr(bench, "EXPAND_TRIALS", [bench.ExpandConfig(block_n=256)])
    point = bench.Point("gemma-2-2b", 1, 1, 8)
    result = bench.measure(point, torch.float32, dev="cpu")
    assert set(result.us) == {"triton", "reference", "loop"}
    assert set(result.triton_groups_us) == {"qkv", "o", "gate_up", "down"}
    assert result.max_rel_error < 1e-5
    rows = bench.tune(point, torch.float32, dev="cpu")  # CPU tensors: the Triton interpreter
    assert [(r["group"], r["kernel"]) for r in rows][:2] == [("qkv", "shrink"), ("qkv", "expand")]
    assert len(rows) == 8 and all(r["best_us"] <= r["default_us"] for r in rows)
