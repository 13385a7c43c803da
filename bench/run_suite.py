"""The serving benchmarks that decide (issue 9): one command starts `loraplex serve` and runs them.

Scenarios, each written to `<out>/serve-<scenario>.json` as soon as it ends:

- adapters: closed loop at fixed concurrency, requests spread uniformly over 1, 8, 32, 128 and
  1000 adapters (all registered at start, 32 GPU slots), and base-model requests only (LoRA
  off: no adapter in any batch) as the baseline.
- rates:    Poisson arrivals over 32 adapters at increasing rates until saturation (achieved
  request rate below 90 % of the offered one, or errors).
- hotload:  closed loop over 32 adapters while new adapters are loaded over the admin API; the
  inter-token latency before, during and after the loads.

`--gpu`: Gemma-2-2B shapes with random bf16 weights (bench/random_checkpoint.py, written once to
`--checkpoint`), rank-16 adapters on all 7 projections; results and `serve.md` into
docs/benchmarks. `--smoke`: the same harness against `loraplex serve --demo` on CPU, seconds
long, into a temporary directory (tests/bench runs it in CI).

    python bench/run_suite.py --gpu                      # -> docs/benchmarks/serve-*.json, serve.md
    python bench/run_suite.py --smoke --out /tmp/smoke
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import plots  # bench/ is sys.path[0] when run as a script
import random_checkpoint
import serve
from benchutil import git_commit
from server_process import ServerProcess, http_json

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = Path("/tmp/loraplex-bench/gemma-2-2b")
SCENARIOS = ("adapters", "rates", "hotload")


@dataclass(frozen=True)
class Profile:
    """Everything that differs between the GPU run and the CPU smoke run."""

    name: str
    server_args: tuple[str, ...]
    registered: tuple[str, ...]  # adapter names the server loads at start
    hot_adapters: tuple[tuple[str, str], ...]  # (name, local dir) loaded during the hotload scenario
    adapters_in_use: tuple[int, ...]
    rates: tuple[float, ...]
    apis: tuple[str, ...]
    load: serve.LoadSpec  # url, adapters and mode are filled in per point
    requests_per_rate_s: float  # Poisson points send rate x this many requests
    hotload_delay_s: float
    env: tuple[tuple[str, str], ...] = ()


def adapter_names(registered: tuple[str, ...], count: int) -> tuple[str, ...]:
    """The first `count` registered names: the adapters one point's traffic spreads over."""
    if count > len(registered):
        raise ValueError(f"{count} adapters asked for, {len(registered)} registered")
    return registered[:count]


def saturated(point: dict, offered_rate: float) -> bool:
    """The server no longer keeps up: errors, or under 90 % of the offered request rate served."""
    return point["errors"] > 0 or point["requests_s"] < 0.9 * offered_rate


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def gpu_profile(args: argparse.Namespace) -> Profile:
    spec = random_checkpoint.CheckpointSpec(args.config, args.checkpoint, device=_device())
    dirs = random_checkpoint.ensure_checkpoint(spec, args.distinct_adapters, 16)
    registered = [{"name": f"r{i}", "source": str(dirs[i % len(dirs)])} for i in range(args.registered)]
    adapters_file = args.checkpoint / f"adapters-{args.registered}.json"
    adapters_file.write_text(json.dumps(registered))
    vocab = json.loads((args.checkpoint / "config.json").read_text())["vocab_size"]
    return Profile(
        name="gpu",
        server_args=("--model-id", str(args.checkpoint), "--adapters-file", str(adapters_file),
                     "--max-loras", str(args.max_loras), "--max-lora-rank", "16", "--dtype", "bfloat16",
                     "--max-cpu-loras", str(args.max_cpu_loras or args.registered),
                     "--max-concurrent-requests", "4096", "--max-input-tokens", "512",
                     "--max-total-tokens", "1024", "--max-batch-prefill-tokens", "4096", "--log-format", "text"),
        registered=tuple(r["name"] for r in registered),
        hot_adapters=tuple((f"hot{i}", str(dirs[i % len(dirs)])) for i in range(4)),
        adapters_in_use=tuple(n for n in (1, 8, 32, 128, 1000) if n <= args.registered),
        rates=(1, 2, 4, 8, 16, 32, 64),
        apis=("openai",),
        load=serve.LoadSpec(url="", api="openai", adapters=("",), num_requests=args.requests,
                            concurrency=args.concurrency, rate=None, prompt_words=(64, 64),
                            output_tokens=(128, 128), zipf=None, seed=0, vocab=vocab),
        requests_per_rate_s=15.0,
        hotload_delay_s=5.0,
    )  # fmt: skip


def smoke_profile(demo_root: Path) -> Profile:
    """`serve --demo` with its assets under `demo_root` (built there if missing)."""
    from loraplex.server.demo_training import build_trained_assets

    demo = build_trained_assets(demo_root).adapters  # what `serve --demo` serves
    return Profile(
        name="smoke",
        server_args=("--demo", "--device", "cpu", "--max-concurrent-requests", "64", "--shutdown-timeout", "2",
                     "--log-format", "text"),
        registered=tuple(demo),
        hot_adapters=(("hot0", str(demo["support"])),),
        adapters_in_use=(1, len(demo)),
        rates=(4.0, 400.0),  # the second is far past what a CPU serves: the sweep must stop there
        apis=("openai", "tgi"),
        load=serve.LoadSpec(url="", api="openai", adapters=("",), num_requests=6, concurrency=3, rate=None,
                            prompt_words=(3, 8), output_tokens=(4, 8), zipf=None, seed=0, timeout_s=120.0),
        requests_per_rate_s=0.25,
        hotload_delay_s=0.3,
        env=(("LORAPLEX_DEMO_DIR", str(demo_root)),),
    )  # fmt: skip


def run_point(spec: serve.LoadSpec, origin: float | None = None) -> tuple[dict, list[serve.RequestResult]]:
    results, duration = asyncio.run(serve.run_load(spec, origin))
    return serve.summarize(spec, results, duration), results


def scenario_adapters(profile: Profile, url: str) -> list[dict]:
    points = []
    for api in profile.apis:
        for count in (0, *profile.adapters_in_use):  # 0: base-model requests only (LoRA off)
            names = adapter_names(profile.registered, count) if count else ("",)
            spec = replace(profile.load, url=url, api=api, adapters=names)
            summary, _ = run_point(spec)
            points.append({"api": api, "adapters_in_use": count, "lora": count > 0, **summary})
            _progress("adapters", points[-1])
    return points


def scenario_rates(profile: Profile, url: str) -> list[dict]:
    names = adapter_names(profile.registered, min(32, len(profile.registered)))
    points = []
    for rate in profile.rates:
        count = max(4, round(rate * profile.requests_per_rate_s))
        spec = replace(profile.load, url=url, adapters=names, concurrency=None, rate=rate, num_requests=count)
        summary, _ = run_point(spec)
        points.append({"offered_rate": rate, "saturated": saturated(summary, rate), **summary})
        _progress("rates", points[-1])
        if points[-1]["saturated"]:
            break
    return points


async def _hotload(profile: Profile, url: str, spec: serve.LoadSpec) -> tuple[list, float, list[dict]]:
    """Load traffic, and the hot adapters one after another once it has run `hotload_delay_s`."""
    origin = time.perf_counter()
    traffic = asyncio.create_task(serve.run_load(spec, origin))
    await asyncio.sleep(profile.hotload_delay_s)
    loads = []
    for name, path in profile.hot_adapters:
        start = time.perf_counter() - origin
        status, body = await asyncio.to_thread(
            http_json, "POST", f"{url}/v1/load_lora_adapter", {"lora_name": name, "lora_path": path}
        )
        end = time.perf_counter() - origin
        loads.append(
            {"name": name, "status": status, "start_s": start, "end_s": end, "error": body.get("error")}
        )
    results, duration = await traffic
    return results, duration, loads


def scenario_hotload(profile: Profile, url: str) -> list[dict]:
    names = adapter_names(profile.registered, min(32, len(profile.registered)))
    spec = replace(profile.load, url=url, adapters=names, num_requests=profile.load.num_requests * 3)
    results, duration, loads = asyncio.run(_hotload(profile, url, spec))
    first, last = loads[0]["start_s"], loads[-1]["end_s"]
    end = max((t for r in results for t in r.token_times_s), default=last)
    windows = {
        "before": serve.window_summary(results, 0.0, first),
        "during": serve.window_summary(results, first, last),
        "after": serve.window_summary(results, last, end),
    }
    point = {
        "loads": loads,
        "windows": windows,
        "timeline": serve.timeline(results, bin_s=max(0.01, duration / 200)),
        **serve.summarize(spec, results, duration),
    }
    _progress("hotload", point)
    return [point]


RUNNERS = {"adapters": scenario_adapters, "rates": scenario_rates, "hotload": scenario_hotload}


def _progress(scenario: str, point: dict) -> None:
    keys = ("api", "adapters_in_use", "offered_rate", "completed", "errors", "output_tok_s", "requests_s")
    print(scenario, json.dumps({k: point[k] for k in keys if k in point}), flush=True)


def environment(profile: Profile, server: ServerProcess) -> dict:
    import torch

    return {
        "profile": profile.name,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none (CPU)",
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "server_args": list(profile.server_args),
        "registered_adapters": len(profile.registered),
        "server_startup_s": round(server.startup_s, 1),
    }


def write_result(out: Path, scenario: str, env: dict, points: list[dict]) -> Path:
    path = out / f"serve-{scenario}.json"
    path.write_text(json.dumps({"env": env, "scenario": scenario, "points": points}, indent=1) + "\n")
    return path


def run_scenarios(
    profile: Profile, server: ServerProcess, out: Path, scenarios: tuple[str, ...]
) -> dict[str, Path]:
    """Run each scenario against a ready server, writing each result as soon as it ends."""
    out.mkdir(parents=True, exist_ok=True)
    env = environment(profile, server)
    return {s: write_result(out, s, env, RUNNERS[s](profile, server.url)) for s in scenarios}


def start_server(profile: Profile, out: Path) -> ServerProcess:
    """The server for `profile`, not yet started: use it as a context manager."""
    return ServerProcess(list(profile.server_args), out / f"server-{profile.name}.log", dict(profile.env))


def run_suite(profile: Profile, out: Path, scenarios: tuple[str, ...]) -> dict[str, Path]:
    """Start the server once and run the scenarios against it."""
    out.mkdir(parents=True, exist_ok=True)
    with start_server(profile, out) as server:
        print(f"server ready in {server.startup_s:.1f} s with {len(profile.registered)} adapters", flush=True)
        return run_scenarios(profile, server, out, scenarios)


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def host_cache_size(requested: int, config: Path, share: float = 0.75) -> int:
    """Adapters whose host copies (bf16, the model's dtype) fit in `share` of RAM."""
    per_adapter = random_checkpoint.adapter_bytes(random_checkpoint.read_config(config), 16,
                                                  random_checkpoint.ALL_PROJECTIONS, bytes_per_value=2)  # fmt: skip
    return max(1, min(requested, int(host_memory_bytes() * share // per_adapter)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--gpu", action="store_true", help="Gemma-2-2B shapes on a CUDA GPU")
    mode.add_argument("--smoke", action="store_true", help="the tiny demo model on CPU, seconds")
    p.add_argument(
        "--out", type=Path, default=None, help="default: docs/benchmarks (gpu), a temp dir (smoke)"
    )
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {', '.join(SCENARIOS)}")
    p.add_argument("--config", type=Path, default=ROOT / "bench" / "configs" / "gemma-2-2b-config.json")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="written here if missing")
    p.add_argument("--registered", type=int, default=1000, help="adapters registered at start (gpu)")
    p.add_argument("--distinct-adapters", type=int, default=64, help="distinct weight dirs behind them (gpu)")
    p.add_argument("--max-loras", type=int, default=32, help="GPU adapter slots (gpu)")
    p.add_argument("--max-cpu-loras", type=int, default=None,
                   help="adapters kept in host memory, the rest re-read from disk (gpu; default: all registered)")  # fmt: skip
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=128, help="requests per closed-loop point (gpu)")
    args = p.parse_args(argv)
    scenarios = tuple(s for s in args.scenarios.split(",") if s)
    if set(scenarios) - set(SCENARIOS):
        p.error(f"unknown scenarios {sorted(set(scenarios) - set(SCENARIOS))}; known: {', '.join(SCENARIOS)}")
    args.scenarios = scenarios
    if args.smoke and args.out is not None and args.out.resolve() == (ROOT / "docs" / "benchmarks").resolve():
        p.error("smoke results never go into docs/benchmarks (that is for GPU results)")
    return args


def missing_server_dependencies() -> list[str]:
    """Modules `loraplex serve` imports that this Python lacks (pydantic: the HTTP bodies and errors)."""
    import importlib.util

    return [name for name in ("pydantic", "aiohttp", "yaml") if importlib.util.find_spec(name) is None]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_server_dependencies()
    if missing:
        print(f"`loraplex serve` needs {', '.join(missing)}, not installed here (pydantic is imported by "
              "server/api_schemas.py, server/openapi.py and server/routes/errors.py). Nothing was run.", file=sys.stderr)  # fmt: skip
        return 1
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("bench/run_suite.py --gpu needs a CUDA GPU; none is available (torch.cuda.is_available() "
                  "is False). Nothing was measured or written. `--smoke` runs the harness on CPU.", file=sys.stderr)  # fmt: skip
            return 1
        wanted = args.max_cpu_loras or args.registered
        args.max_cpu_loras = host_cache_size(wanted, args.config)
        if args.max_cpu_loras < wanted:
            print(
                f"host memory holds {args.max_cpu_loras} adapters: the others are re-read from disk",
                flush=True,
            )
        profile, out = gpu_profile(args), args.out or ROOT / "docs" / "benchmarks"
    else:
        from loraplex.server.demo_training import default_root

        demo_root = default_root()  # `serve --demo`'s own cache: trained once per machine
        profile, out = smoke_profile(demo_root), args.out or Path(tempfile.mkdtemp(prefix="loraplex-smoke-"))
    written = run_suite(profile, out, args.scenarios)
    if args.gpu:
        plots.write_serve_markdown(out, out / "serve.md")
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
