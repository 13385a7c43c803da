"""Engine decode benchmark (GPU, offline, no HTTP): decode step time against the byte floors.

Gemma-2-2B shapes with random bf16 weights (bench/random_checkpoint.py writes them once),
for every batch size x number of distinct rank-16 adapters (all 7 projections; request i
uses adapter i % adapters, 0 = base model): the `LLMEngine` runs the batch to steady decode,
then each `step()` is timed with CUDA synchronised around it (`step_ms`: schedule, forward,
sample, detokenize) and so is `ModelRunner.execute` inside it (`forward_ms`). Medians.

Floors (DESIGN §9): a decode step must read every weight once plus the distinct adapters,
so it can't beat (weight bytes + adapters x adapter bytes) / measured copy bandwidth. The
transformers and PEFT baselines (bench/baselines.py) run in the same process afterwards.

    python bench/engine.py                  # full sweep + baselines -> docs/benchmarks/engine.{md,json}
    python bench/engine.py --quick          # batch 32 x 32 adapters only, no baselines
    python bench/engine.py --quick --cuda-graphs false   # the same, eager decode steps
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import baselines  # bench/ is sys.path[0] when run as a script
import random_checkpoint
import torch
from benchutil import copy_bandwidth, git_commit, markdown_table

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CHECKPOINT = Path("/tmp/loraplex-bench/gemma-2-2b")
NUM_SLOTS = 32  # GPU adapter slots: enough for the largest number of distinct adapters
TARGET_FACTOR = 1.5  # issue 4: batch 32 x 32 adapters within 1.5x of its floor
_SPARE_TOKENS = 16  # requests prefilled in an earlier chunk decode a few extra steps


@dataclass(frozen=True)
class Point:
    batch: int
    adapters: int  # distinct adapters in the batch; 0 = base model only


@dataclass(frozen=True)
class Floors:
    """Byte model of one decode step, from the config (DESIGN §9)."""

    weight_bytes: int
    adapter_bytes: int
    copy_bytes_per_s: float

    def step_s(self, adapters: int) -> float:
        return (self.weight_bytes + adapters * self.adapter_bytes) / self.copy_bytes_per_s


@dataclass
class PointResult:
    point: Point
    step_ms: float
    forward_ms: float
    floor_ms: float

    @property
    def tok_s(self) -> float:
        return self.point.batch / self.step_ms * 1e3

    def row(self) -> dict:
        return {
            "batch": self.point.batch,
            "adapters": self.point.adapters,
            "step_ms": round(self.step_ms, 3),
            "forward_ms": round(self.forward_ms, 3),
            "tok_s": round(self.tok_s, 1),
            "floor_ms": round(self.floor_ms, 3),
            "x_floor": round(self.step_ms / self.floor_ms, 2),
        }


def weight_bytes(config: dict, bytes_per_value: int = 2) -> int:
    shapes = random_checkpoint.parameter_shapes(config)
    return sum(math.prod(s) for s in shapes.values()) * bytes_per_value


def floors_for(config: dict, rank: int, copy_bytes_per_s: float) -> Floors:
    adapter = random_checkpoint.adapter_bytes(config, rank, random_checkpoint.ALL_PROJECTIONS)
    return Floors(weight_bytes(config), adapter, copy_bytes_per_s)


def sweep(batches: list[int], adapters: list[int]) -> list[Point]:
    """Every batch x adapters pair where the batch can hold that many distinct adapters."""
    return [Point(b, a) for b in batches for a in adapters if a <= b]


def build_engine(checkpoint: Path, adapter_dirs: list[Path], args: argparse.Namespace, device: str = "cuda"):
    """An LLMEngine with every adapter registered and a KV cache just big enough for the sweep."""
    from loraplex.server.adapters.registry import AdapterEntry
    from loraplex.server.async_engine import load_local_adapter
    from loraplex.server.engine import EngineConfig, LLMEngine
    from loraplex.server.engine_api import LoadAdapterSpec
    from loraplex.server.sequence import AdapterRef

    tokens_per_seq = args.prompt_tokens + args.warmup_steps + args.steps + _SPARE_TOKENS + 8
    config = EngineConfig(
        model_path=str(checkpoint),
        dtype="bfloat16" if device == "cuda" else "float32",
        device=device,
        max_loras=NUM_SLOTS,
        max_lora_rank=args.rank,
        max_num_seqs=max(args.batches),
        max_batch_tokens=4096,
        max_total_tokens=tokens_per_seq + 1,
        max_input_tokens=args.prompt_tokens,
        num_kv_blocks=math.ceil(tokens_per_seq / 16 + 1) * max(args.batches),
        enable_prefix_caching=False,  # every request's prompt is new anyway
        cuda_graphs=args.cuda_graphs,
    )
    engine = LLMEngine.from_config(config)
    for i, path in enumerate(adapter_dirs):
        spec = LoadAdapterSpec(name=f"a{i}", source=str(path))
        weights = load_local_adapter(spec, engine.runner.hf_config, args.rank)
        engine.add_adapter(AdapterEntry(ref=AdapterRef(spec.name, 0), weights=weights, source=spec.source))
    return engine


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class _TimedForward:
    """Wraps ModelRunner.execute (or execute_decode) to time it (synchronised), applied from outside the engine."""

    def __init__(self, execute) -> None:
        self.execute, self.seconds = execute, 0.0

    def __call__(self, batch):
        _sync()
        start = time.perf_counter()
        logits = self.execute(batch)
        _sync()
        self.seconds = time.perf_counter() - start
        return logits


def _requests(point: Point, args: argparse.Namespace, vocab: int) -> list:
    from loraplex.server.request import GenerationRequest
    from loraplex.server.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(point.batch * 100 + point.adapters)
    params = SamplingParams(max_new_tokens=args.warmup_steps + args.steps + _SPARE_TOKENS, ignore_eos=True)
    return [
        GenerationRequest(
            request_id=f"b{point.batch}-a{point.adapters}-{i}",
            prompt_token_ids=tuple(torch.randint(0, vocab, (args.prompt_tokens,), generator=gen).tolist()),
            params=params,
            adapter=f"a{i % point.adapters}" if point.adapters else None,
        )
        for i in range(point.batch)
    ]


def measure_point(engine, point: Point, args: argparse.Namespace, floors: Floors) -> PointResult:
    """Prefill the batch, warm up, then time `args.steps` steps that each decode the whole batch."""
    requests = _requests(point, args, engine.runner.vocab_size)
    for request in requests:
        engine.add_request(request)
    started: set[str] = set()
    while len(started) < point.batch:  # prefill (maybe chunked) until every request has a token
        started.update(event.request_id for event in engine.step())
    for _ in range(args.warmup_steps):
        engine.step()
    # `execute_decode`: the engine's steady decode steps (the same sequences as the step before).
    names = [name for name in ("execute", "execute_decode") if hasattr(engine.runner, name)]
    timers = [_TimedForward(getattr(engine.runner, name)) for name in names]
    for name, timer in zip(names, timers, strict=True):
        setattr(engine.runner, name, timer)
    step_s, forward_s = [], []
    try:
        for _ in range(args.steps):
            for timer in timers:
                timer.seconds = 0.0
            _sync()
            start = time.perf_counter()
            events = engine.step()
            _sync()
            step_s.append(time.perf_counter() - start)
            forward_s.append(sum(timer.seconds for timer in timers))
            if len(events) != point.batch:
                raise RuntimeError(f"{point}: a step decoded {len(events)} sequences, not {point.batch}")
    finally:
        for name in names:
            delattr(engine.runner, name)  # back to the class methods
        for request in requests:
            engine.abort(request.request_id)
    return PointResult(
        point,
        step_ms=statistics.median(step_s) * 1e3,
        forward_ms=statistics.median(forward_s) * 1e3,
        floor_ms=floors.step_s(point.adapters) * 1e3,
    )


def environment(floors: Floors) -> dict:
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": __import__("peft").__version__,
        "copy_GBps": round(floors.copy_bytes_per_s / 1e9),
        "weight_GB": round(floors.weight_bytes / 1e9, 3),
        "adapter_MB": round(floors.adapter_bytes / 1e6, 1),
    }


def _graphs_note(args: argparse.Namespace) -> str:
    return "decode under CUDA graphs" if args.cuda_graphs else "decode eager (--cuda-graphs false)"


def headline(results: list[PointResult], base: list[dict]) -> str:
    """Issue 4's target and DESIGN §9's comparison, in words, from the measured numbers only."""
    lines = []
    for r in results:
        if (r.point.batch, r.point.adapters) == (32, 32):
            verdict = "meets" if r.step_ms <= TARGET_FACTOR * r.floor_ms else "misses"
            lines.append(
                f"Batch 32 with 32 distinct adapters: {r.step_ms:.2f} ms/step, {r.step_ms / r.floor_ms:.2f}x its "
                f"{r.floor_ms:.2f} ms floor ({verdict} the {TARGET_FACTOR}x target); {r.tok_s:.0f} tok/s."
            )
            peft = next((b for b in base if b["name"] == "peft"), None)
            if peft:
                lines.append(f"PEFT, same batch and adapters: {peft['ms_per_step']} ms/step, "
                             f"{peft['tok_s']} tok/s ({r.tok_s / peft['tok_s']:.0f}x slower than loraplex).")  # fmt: skip
    return "\n\n".join(lines)


def write_reports(results: list[PointResult], base: list[dict], env: dict, args: argparse.Namespace) -> None:
    rows = [r.row() for r in results]
    payload = {"env": env, "args": _plain(vars(args)), "rows": rows, "baselines": base}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=1) + "\n")
    md = [
        "# Engine decode benchmark",
        "",
        f"{env['gpu']}, {env['date']}, commit {env['commit']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, peft {env['peft']}; copy bandwidth {env['copy_GBps']} GB/s. "
        f"Produced by `python bench/engine.py`; {_graphs_note(args)}.",
        "",
        f"Gemma-2-2B shapes, random bf16 weights ({env['weight_GB']} GB), rank-{args.rank} adapters on all 7 "
        f"projections ({env['adapter_MB']} MB each), prompts of {args.prompt_tokens} tokens, medians of "
        f"{args.steps} decode steps. `floor_ms`: weights + distinct adapters at copy bandwidth; `x_floor`: "
        "step_ms / floor_ms; `forward_ms`: the model forward alone inside the step.",
        "",
        headline(results, base),
        "",
        markdown_table(rows),
        "",
    ]
    if base:
        md += ["## Baselines (same process, same checkpoint)", "", markdown_table(base), ""]
    args.markdown.parent.mkdir(parents=True, exist_ok=True)
    args.markdown.write_text("\n".join(md))


def _plain(values: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "bench" / "configs" / "gemma-2-2b-config.json")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="written here if missing")
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--adapters", type=ints, default=[0, 1, 8, 32])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--warmup-steps", type=int, default=5)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--baseline-batch", type=int, default=32)
    p.add_argument("--base-new-tokens", type=int, default=128)
    p.add_argument("--peft-new-tokens", type=int, default=32)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--quick", action="store_true", help="batch 32 x 32 adapters, no baselines")
    p.add_argument("--cuda-graphs", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                   help="decode under CUDA graphs (true, the default) or eagerly (false)")  # fmt: skip
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "engine.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks" / "engine.md")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.adapters, args.no_baselines = [32], [32], True
    if max(args.adapters) > NUM_SLOTS:
        p.error(f"at most {NUM_SLOTS} distinct adapters (GPU slots)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/engine.py measures GPU decode steps and needs a CUDA GPU; none is available "
              "(torch.cuda.is_available() is False). Nothing was measured or written.", file=sys.stderr)  # fmt: skip
        return 1
    config = random_checkpoint.read_config(args.config)
    spec = random_checkpoint.CheckpointSpec(args.config, args.checkpoint, device="cuda")
    adapter_dirs = random_checkpoint.ensure_checkpoint(spec, max(max(args.adapters), 1), args.rank)
    floors = floors_for(config, args.rank, copy_bandwidth())
    print(f"{torch.cuda.get_device_name()}: copy {floors.copy_bytes_per_s / 1e9:.0f} GB/s", flush=True)
    engine = build_engine(args.checkpoint, adapter_dirs, args)
    results = []
    for point in sweep(args.batches, args.adapters):
        results.append(measure_point(engine, point, args, floors))
        print(json.dumps(results[-1].row()), flush=True)
    del engine
    gc.collect()  # the engine's weights and KV cache must be gone before the baselines load theirs
    torch.cuda.empty_cache()
    base = []
    if not args.no_baselines:
        new_tokens = {"transformers": args.base_new_tokens, "peft": args.peft_new_tokens}
        dirs = adapter_dirs[:32]
        found = baselines.run_baselines(
            args.checkpoint, dirs, args.baseline_batch, args.prompt_tokens, new_tokens, "cuda"
        )
        base = [r.row() for r in found]
        print(json.dumps(base), flush=True)
    write_reports(results, base, environment(floors), args)
    print(markdown_table([r.row() for r in results]))
    print(f"wrote {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
