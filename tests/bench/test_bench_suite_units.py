"""bench/run_suite.py and bench/plots.py pure parts: scenario policy and the targets of issue 9."""

from __future__ import annotations

from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[2] / "bench" / "configs"


def test_traffic_spreads_over_the_first_registered_names(bench_suite):
    registered = tuple(f"r{i}" for i in range(1000))
    assert bench_suite.adapter_names(registered, 8) == registered[:8]
    with pytest.raises(ValueError, match="1001 adapters asked for"):
        bench_suite.adapter_names(registered, 1001)


def test_saturation_is_errors_or_falling_behind(bench_suite):
    assert not bench_suite.saturated({"errors": 0, "requests_s": 9.1}, 10.0)
    assert bench_suite.saturated({"errors": 0, "requests_s": 8.9}, 10.0)
    assert bench_suite.saturated({"errors": 1, "requests_s": 10.0}, 10.0)


def test_host_cache_is_capped_by_host_memory(bench_suite, monkeypatch):
    config = CONFIGS / "gemma-2-2b-config.json"  # 41.5 MB per adapter in bf16 host copies
    monkeypatch.setattr(bench_suite, "host_memory_bytes", lambda: 128 * 2**30)
    assert bench_suite.host_cache_size(1000, config) == 1000
    monkeypatch.setattr(bench_suite, "host_memory_bytes", lambda: 24 * 2**30)
    assert bench_suite.host_cache_size(1000, config) == int(24 * 2**30 * 0.75 // 41_533_440)


def test_cli_refuses_smoke_results_in_docs_and_unknown_scenarios(bench_suite, capsys):
    with pytest.raises(SystemExit):
        bench_suite.parse_args(["--smoke", "--out", str(bench_suite.ROOT / "docs" / "benchmarks")])
    assert "never go into docs/benchmarks" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench_suite.parse_args(["--gpu", "--scenarios", "adapters,warp"])
    assert bench_suite.parse_args(["--gpu", "--scenarios", "rates"]).scenarios == ("rates",)


def _point(api: str, count: int, tok_s: float) -> dict:
    return {"api": api, "adapters_in_use": count, "output_tok_s": tok_s, "spec": {"concurrency": 32}}


def test_targets_come_from_the_measured_numbers_only(bench_plots):
    adapters = {"points": [_point("openai", 0, 1000.0), _point("openai", 1, 900.0), _point("openai", 32, 850.0),
                           _point("openai", 1000, 600.0), _point("tgi", 32, 1.0)]}  # fmt: skip
    engine = {"baselines": [{"name": "peft", "tok_s": 2.5, "batch": 32, "distinct_adapters": 32}], "rows": []}
    found = {
        t["target"].split(" vs ")[1]: (t["measured"], t["met"]) for t in bench_plots.targets(engine, adapters)
    }
    assert found == {
        "PEFT mixed-adapter batch 32": ("340.0x", "yes"),
        "LoRA off, same concurrency": ("0.85x", "yes"),
        "1 adapter, same concurrency": ("0.67x", "no"),
    }
    missing = bench_plots.targets(None, {"points": [_point("openai", 32, 850.0)]})
    assert [t["met"] for t in missing] == ["-", "-", "-"]  # nothing claimed without both numbers
