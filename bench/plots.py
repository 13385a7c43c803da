"""Plots and the serving report, made only from result files (never from numbers typed in).

Reads what exists of `engine.json` (bench/engine.py) and `serve-{adapters,rates,hotload}.json`
(bench/run_suite.py) in `--results`, writes the PNGs for those files and `serve.md` (tables,
GPU, date, commit, and issue 9's targets checked against the measured numbers).

    python bench/plots.py --results docs/benchmarks --out docs/benchmarks
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchutil import markdown_table

ROOT = Path(__file__).resolve().parent.parent
# issue 9's targets: (description, ratio that must hold)
PEFT_FACTOR, LORA_OFF_SHARE, THOUSAND_SHARE = 300.0, 0.8, 0.7


def results_table(rows: list[dict]) -> str:
    return markdown_table(rows, empty="(no results)")


def load(results: Path, name: str) -> dict | None:
    path = results / name
    return json.loads(path.read_text()) if path.exists() else None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def plot_adapters(data: dict, path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for api in sorted({p["api"] for p in data["points"]}):
        points = [p for p in data["points"] if p["api"] == api]
        lora = [p for p in points if p["adapters_in_use"] > 0]
        xs, ys = [p["adapters_in_use"] for p in lora], [p["output_tok_s"] for p in lora]
        (line,) = ax.plot(xs, ys, "o-", label=f"{api}: LoRA")
        for p in points:
            if p["adapters_in_use"] == 0:
                ax.axhline(
                    p["output_tok_s"], linestyle="--", color=line.get_color(), label=f"{api}: LoRA off"
                )
    ax.set(xscale="log", xlabel="adapters in the traffic (uniform)", ylabel="output tokens/s",
           title=f"Throughput vs adapters, concurrency {data['points'][0]['spec']['concurrency']}")  # fmt: skip
    counts = sorted({p["adapters_in_use"] for p in data["points"]} - {0})
    ax.set_xticks(counts, [str(c) for c in counts])
    ax.minorticks_off()
    ax.set_ylim(bottom=0)
    ax.legend()
    return _save(fig, path)


def plot_rates(data: dict, path: Path) -> Path:
    plt = _pyplot()
    points = data["points"]
    rates = [p["offered_rate"] for p in points]
    fig, (ttft, itl) = plt.subplots(1, 2, figsize=(10, 4))
    for q in ("p50", "p99"):
        ttft.plot(rates, [p["ttft_s"][q] for p in points], "o-", label=f"TTFT {q}")
        itl.plot(rates, [p["itl_s"][q] for p in points], "o-", label=f"inter-token {q}")
    ttft.set(
        xlabel="offered requests/s (Poisson)", ylabel="seconds", yscale="log", title="Time to first token"
    )
    itl.set(
        xlabel="offered requests/s (Poisson)", ylabel="seconds", yscale="log", title="Inter-token latency"
    )
    ttft.legend()
    itl.legend()
    return _save(fig, path)


def plot_hotload(data: dict, path: Path) -> Path:
    plt = _pyplot()
    point = data["points"][0]
    line = [b for b in point["timeline"] if b["itl_max_s"] is not None]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([b["t_s"] for b in line], [b["itl_max_s"] for b in line], label="largest inter-token gap")
    ax.plot([b["t_s"] for b in line], [b["itl_p50_s"] for b in line], label="median inter-token gap")
    for i, load in enumerate(point["loads"]):
        ax.axvspan(
            load["start_s"],
            load["end_s"],
            color="orange",
            alpha=0.3,
            label="adapter load" if i == 0 else None,
        )
    ax.set(
        xlabel="seconds into the run", ylabel="seconds", yscale="log", title="Hot-loading adapters under load"
    )
    ax.legend()
    return _save(fig, path)


def comparison_rows(engine: dict | None, adapters: dict | None) -> list[dict]:
    """tok/s of the baselines and of loraplex (engine offline, and over HTTP), as measured."""
    rows = []
    for b in (engine or {}).get("baselines", []):
        label = "transformers generate (base)" if b["name"] == "transformers" else "PEFT, mixed adapters"
        rows.append(
            {"system": label, "batch": b["batch"], "adapters": b["distinct_adapters"], "tok_s": b["tok_s"]}
        )
    for r in (engine or {}).get("rows", []):
        if r["batch"] == 32 and r["adapters"] in (0, 32):
            rows.append(
                {
                    "system": "loraplex engine (offline)",
                    "batch": 32,
                    "adapters": r["adapters"],
                    "tok_s": r["tok_s"],
                }
            )
    for p in (adapters or {}).get("points", []):
        if p["adapters_in_use"] in (0, 32) and p["api"] == "openai":
            rows.append({"system": "loraplex serve (HTTP)", "batch": p["spec"]["concurrency"],
                         "adapters": p["adapters_in_use"], "tok_s": round(p["output_tok_s"], 1)})  # fmt: skip
    return rows


def plot_comparison(rows: list[dict], path: Path) -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [f"{r['system']}\n{r['adapters']} adapters" for r in rows]
    ax.barh(labels, [r["tok_s"] for r in rows])
    ax.set(xscale="log", xlabel="output tokens/s (batch or concurrency 32)", title="loraplex vs baselines")
    return _save(fig, path)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    __import__("matplotlib.pyplot").pyplot.close(fig)
    return path


def make_plots(results: Path, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    engine, adapters = load(results, "engine.json"), load(results, "serve-adapters.json")
    rates, hotload = load(results, "serve-rates.json"), load(results, "serve-hotload.json")
    made = []
    if adapters:
        made.append(plot_adapters(adapters, out / "throughput_vs_adapters.png"))
    if rates:
        made.append(plot_rates(rates, out / "latency_vs_rate.png"))
    if hotload:
        made.append(plot_hotload(hotload, out / "hotload.png"))
    rows = comparison_rows(engine, adapters)
    if rows:
        made.append(plot_comparison(rows, out / "vs_baselines.png"))
    return made


def _tok_s(adapters: dict | None, count: int) -> float | None:
    points = [
        p
        for p in (adapters or {}).get("points", [])
        if p["adapters_in_use"] == count and p["api"] == "openai"
    ]
    return points[0]["output_tok_s"] if points else None


def targets(engine: dict | None, adapters: dict | None) -> list[dict]:
    """Issue 9's three targets, each with the measured ratio (None where a number is missing)."""
    peft = next((b["tok_s"] for b in (engine or {}).get("baselines", []) if b["name"] == "peft"), None)
    at = {n: _tok_s(adapters, n) for n in (0, 1, 32, 1000)}

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 2) if a is not None and b else None

    found = [
        ("32 adapters at concurrency 32 vs PEFT mixed-adapter batch 32", ratio(at[32], peft), PEFT_FACTOR),
        ("32 adapters vs LoRA off, same concurrency", ratio(at[32], at[0]), LORA_OFF_SHARE),
        ("1000 adapters vs 1 adapter, same concurrency", ratio(at[1000], at[1]), THOUSAND_SHARE),
    ]
    return [
        {"target": name, "needed": f">= {need}x", "measured": "-" if got is None else f"{got}x",
         "met": "-" if got is None else ("yes" if got >= need else "no")}
        for name, got, need in found
    ]  # fmt: skip


def load_rows(points: list[dict], first: tuple[str, ...]) -> list[dict]:
    """One table row per load point: its own keys, then throughput and latency percentiles (ms)."""
    return [
        {**{k: p[k] for k in first}, "completed": p["completed"], "errors": p["errors"],
         "tok_s": round(p["output_tok_s"], 1), "req_s": round(p["requests_s"], 2),
         "ttft_p50_ms": _ms(p["ttft_s"]["p50"]), "ttft_p99_ms": _ms(p["ttft_s"]["p99"]),
         "itl_p50_ms": _ms(p["itl_s"]["p50"]), "itl_p99_ms": _ms(p["itl_s"]["p99"])}
        for p in points
    ]  # fmt: skip


def hotload_rows(data: dict) -> list[dict]:
    windows = data["points"][0]["windows"]
    return [
        {"window": name, "streamed_tokens": w["streamed_tokens"], "tok_s": round(w["streamed_tok_s"], 1),
         "itl_p50_ms": _ms(w["itl_s"]["p50"]), "itl_p99_ms": _ms(w["itl_s"]["p99"]), "itl_max_ms": _ms(w["itl_s"]["max"])}
        for name, w in windows.items()
    ]  # fmt: skip


def _produced_by(env: dict) -> str:
    if env["profile"] == "smoke":
        return "A CPU smoke run (`bench/run_suite.py --smoke`, tiny demo model): it checks the harness, it measures nothing."
    return "Produced by `python bench/run_suite.py --gpu`; plots by `python bench/plots.py`."


def write_serve_markdown(results: Path, md_path: Path) -> Path:
    engine, adapters = load(results, "engine.json"), load(results, "serve-adapters.json")
    rates, hotload = load(results, "serve-rates.json"), load(results, "serve-hotload.json")
    env = next((d["env"] for d in (adapters, rates, hotload) if d), None)
    if env is None:
        raise FileNotFoundError(f"no serve-*.json results in {results}")
    md = [
        "# Serving benchmark",
        "",
        f"{env['gpu']}, {env['date']}, commit {env['commit']}; {env['registered_adapters']} adapters registered; "
        f"server: `loraplex serve {' '.join(env['server_args'])}` (ready in {env['server_startup_s']} s). "
        + _produced_by(env),
        "",
        "## Targets (issue 9)",
        "",
        results_table(targets(engine, adapters)),
        "",
    ]
    if adapters:
        md += ["## Throughput vs adapters (closed loop; 0 = LoRA off)", "",
               results_table(load_rows(adapters["points"], ("api", "adapters_in_use"))), ""]  # fmt: skip
    if rates:
        md += [
            "## Poisson arrivals over 32 adapters",
            "",
            results_table(load_rows(rates["points"], ("offered_rate",))),
            "",
        ]
    if hotload:
        loads = hotload["points"][0]["loads"]
        md += ["## Hot-loading adapters under load", "",
               f"{len(loads)} adapters loaded one after another, each in "
               + ", ".join(f"{load['end_s'] - load['start_s']:.2f} s" for load in loads) + ".", "",
               results_table(hotload_rows(hotload)), ""]  # fmt: skip
    rows = comparison_rows(engine, adapters)
    if rows:
        md += ["## loraplex vs baselines", "", results_table(rows), ""]
    md_path.write_text("\n".join(md))
    return md_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--out", type=Path, default=None, help="default: --results")
    p.add_argument("--no-markdown", action="store_true")
    args = p.parse_args(argv)
    out = args.out or args.results
    made = make_plots(args.results, out)
    if not args.no_markdown and any(
        (args.results / f"serve-{s}.json").exists() for s in ("adapters", "rates", "hotload")
    ):
        made.append(write_serve_markdown(args.results, out / "serve.md"))
    if not made:
        print(f"no result files in {args.results}: nothing to plot", file=sys.stderr)
        return 1
    print("wrote " + ", ".join(str(m) for m in made))
    return 0


if __name__ == "__main__":
    sys.exit(main())
