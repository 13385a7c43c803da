"""The benchmark harness end to end on CPU: the real `loraplex serve --demo` process, bench/serve.py
as a command (closed loop and Poisson, TGI and OpenAI APIs), the scenarios, the plots."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.server.demo_training import TrainedAssets

SERVE = Path(__file__).resolve().parents[2] / "bench" / "serve.py"


@pytest.fixture(scope="module")
def smoke(
    bench_suite, trained_assets: TrainedAssets, tmp_path_factory
) -> Iterator[tuple[object, object, Path]]:
    """(profile, running server, output dir); the server reuses the session's demo assets."""
    profile = bench_suite.smoke_profile(trained_assets.root.parent)
    out = tmp_path_factory.mktemp("smoke")
    with bench_suite.start_server(profile, out) as server:
        yield profile, server, out


def _ordered(stats: dict) -> bool:
    return 0 < stats["p50"] <= stats["p90"] <= stats["p99"]


@pytest.mark.parametrize("api", ["tgi", "openai"])
@pytest.mark.parametrize("mode", [["--concurrency", "3"], ["--rate", "20"]], ids=["closed", "poisson"])
def test_load_generator_command(smoke, api: str, mode: list[str], tmp_path: Path) -> None:
    _, server, _ = smoke
    out = tmp_path / "load.json"
    command = [sys.executable, str(SERVE), "--url", server.url, "--api", api, "--adapters", "sql,support,,poem",
               "--num-requests", "8", "--prompt-words", "3:6", "--output-tokens", "4:6", "--zipf", "1.1",
               "--json", str(out), *mode]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:] + done.stdout[-2000:]
    summary = json.loads(out.read_text())
    assert (summary["completed"], summary["errors"]) == (8, 0)
    assert 8 * 1 <= summary["output_tokens"] <= 8 * 6  # the tiny model may stop early at its EOS
    assert summary["output_tok_s"] > 0 and summary["requests_s"] > 0
    assert _ordered(summary["ttft_s"]) and _ordered(summary["latency_s"])
    assert summary["ttft_s"]["p99"] <= summary["latency_s"]["p99"]


def test_scenarios_and_their_report(bench_suite, bench_plots, smoke) -> None:
    profile, server, out = smoke
    written = bench_suite.run_scenarios(profile, server, out, bench_suite.SCENARIOS)
    assert set(written) == {"adapters", "rates", "hotload"}

    adapters = json.loads(written["adapters"].read_text())
    registered = len(profile.registered)  # the demo's four fine-tunes
    assert adapters["env"]["profile"] == "smoke" and adapters["env"]["registered_adapters"] == registered
    seen = {(p["api"], p["adapters_in_use"]) for p in adapters["points"]}
    assert seen == {(api, n) for api in ("openai", "tgi") for n in (0, 1, registered)}
    for point in adapters["points"]:
        assert point["errors"] == 0 and point["output_tokens"] > 0 and _ordered(point["ttft_s"])

    rates = json.loads(written["rates"].read_text())["points"]
    assert rates[0]["errors"] == 0 and not rates[0]["saturated"]
    assert rates[-1]["saturated"]  # the sweep stops at the first rate the server can't keep up with

    hot = json.loads(written["hotload"].read_text())["points"][0]
    assert [load["status"] for load in hot["loads"]] == [200]
    assert hot["errors"] == 0 and hot["windows"]["before"]["streamed_tokens"] > 0
    assert 0 < sum(b["streamed_tokens"] for b in hot["timeline"]) <= hot["output_tokens"]

    made = bench_plots.make_plots(out, out / "plots")
    assert {p.name for p in made} == {"throughput_vs_adapters.png", "latency_vs_rate.png", "hotload.png",
                                      "vs_baselines.png"}  # fmt: skip
    assert all(p.stat().st_size > 10_000 for p in made)
    report = bench_plots.write_serve_markdown(out, out / "serve.md").read_text()
    assert "it measures nothing" in report and f"| openai | {registered} | 6 | 0 |" in report
