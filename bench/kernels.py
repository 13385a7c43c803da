"""Benchmark of the batched-LoRA kernels on one transformer layer's projections (GPU only).

For Gemma-2-2B and Mistral-7B shapes (bench/configs, random weights: speed depends on shapes),
every combination of tokens T, distinct adapters in the batch and rank, three ways of adding
LoRA to the layer's 7 projections (4 fused groups: qkv, o, gate_up, down):

- triton:    loraplex.kernels.triton_lora lora_shrink + lora_expand (8 launches per layer)
- reference: the torch gather + bmm ops (loraplex.kernels.reference)
- loop:      one index_select + two matmuls + index_add per adapter and projection (PEFT's way)

Each is captured in a CUDA graph (as the engine decodes) and timed by replaying it under
`triton.testing.do_bench` (median; L2 flushed between runs, so adapter bytes come from HBM).
Bytes that must move: x, the distinct adapters' A and B, y written and read, out read and
written. Achieved bandwidth is compared with the measured device-to-device copy bandwidth.

    python bench/kernels.py            # full sweep, writes docs/benchmarks/kernels.{md,json}
    python bench/kernels.py --quick    # the headline point only (Gemma, T=32, 32 x rank 16)
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from benchutil import copy_bandwidth, markdown_table

from loraplex.kernels import reference, triton_lora
from loraplex.kernels.meta import LoraBatchMeta
from loraplex.kernels.triton_lora import ExpandConfig, ShrinkConfig

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {"gemma-2-2b": "gemma-2-2b-config.json", "mistral-7b": "mistral-7b-v0.1-config.json"}
IMPLS = ("triton", "reference", "loop")
NUM_SLOTS = 32  # GPU adapter slots (max_loras); the batch uses `adapters` of them
TARGET_SHARE, TARGET_SPEEDUP = 0.60, 5.0  # issue 3: share of copy bandwidth, speedup over the loop


@dataclass(frozen=True)
class Group:
    """Projections sharing one input and one launch: name, input width, output slice widths."""

    name: str
    in_features: int
    widths: tuple[int, ...]


@dataclass(frozen=True)
class Point:
    model: str
    tokens: int
    adapters: int
    rank: int


@dataclass
class Result:
    point: Point
    bytes: int
    us: dict[str, float]  # median µs per implementation, whole layer
    triton_groups_us: dict[str, float]
    max_rel_error: float  # triton against the reference on this point


def layer_groups(model: str) -> list[Group]:
    cfg = json.loads((ROOT / "bench" / "configs" / CONFIGS[model]).read_text())
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg.get("head_dim") or hidden // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    return [
        Group("qkv", hidden, (q, kv, kv)),
        Group("o", q, (hidden,)),
        Group("gate_up", hidden, (inter, inter)),
        Group("down", inter, (hidden,)),
    ]


@dataclass
class GroupTensors:
    x: torch.Tensor
    a_slots: list[torch.Tensor]
    b_slots: list[torch.Tensor]
    out: torch.Tensor


@dataclass
class Layer:
    groups: list[Group]
    tensors: list[GroupTensors]
    meta: LoraBatchMeta
    rank: int
    rows_per_slot: list[tuple[int, torch.Tensor]]  # for the per-adapter loop, built outside timing


def build_layer(groups: list[Group], point: Point, dtype: torch.dtype, dev: str = "cuda") -> Layer:
    """Random weights; token t uses adapter t % adapters: the batch is interleaved, not sorted."""
    r = point.rank
    slots = torch.arange(point.tokens, device=dev) % point.adapters
    ranks = torch.full((NUM_SLOTS,), r, dtype=torch.int32, device=dev)
    tensors = [
        GroupTensors(
            x=torch.randn(point.tokens, g.in_features, device=dev, dtype=dtype),
            a_slots=[torch.randn(NUM_SLOTS, r, g.in_features, device=dev, dtype=dtype) / g.in_features**0.5
                     for _ in g.widths],
            b_slots=[torch.randn(NUM_SLOTS, w, r, device=dev, dtype=dtype) / r**0.5 for w in g.widths],
            out=torch.zeros(point.tokens, sum(g.widths), device=dev, dtype=dtype),
        )
        for g in groups
    ]  # fmt: skip
    rows = [(s, (slots == s).nonzero().flatten()) for s in range(point.adapters)]
    return Layer(groups, tensors, LoraBatchMeta.build(slots, ranks), r, rows)


def triton_step(layer: Layer, only: str | None = None) -> None:
    for g, t in zip(layer.groups, layer.tensors, strict=True):
        if only in (None, g.name):
            y = triton_lora.lora_shrink(t.x, t.a_slots, layer.meta)
            triton_lora.lora_expand(y, t.b_slots, layer.meta, t.out, add=True)


def reference_step(layer: Layer) -> None:
    for t in layer.tensors:
        reference.lora_add(t.x, t.a_slots, t.b_slots, layer.meta, t.out)  # the form the model runs


def loop_step(layer: Layer) -> None:
    """What PEFT does for a mixed batch: per adapter, per projection, gather rows and matmul."""
    for t in layer.tensors:
        for slot, rows in layer.rows_per_slot:
            x = t.x.index_select(0, rows)
            offset = 0
            for a, b in zip(t.a_slots, t.b_slots, strict=True):
                width = b.shape[1]
                delta = (x @ a[slot].T) @ b[slot].T
                t.out[:, offset : offset + width].index_add_(0, rows, delta)
                offset += width


def layer_bytes(groups: list[Group], point: Point, element: int) -> int:
    """Bytes a perfect implementation moves: x, distinct A and B, y (f32, out and back), out r+w."""
    total = 0
    for g in groups:
        width, slices = sum(g.widths), len(g.widths)
        total += point.tokens * g.in_features * element  # x
        total += point.adapters * point.rank * (slices * g.in_features + width) * element  # A, B
        total += 2 * slices * point.tokens * point.rank * 4  # y
        total += 2 * point.tokens * width * element  # out
    return total


def time_graph(fn: Callable[[], None]) -> float:
    """Median µs of replaying `fn` captured in a CUDA graph."""
    import triton.testing

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # compile kernels and settle allocations outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    return ms * 1e3


def check_accuracy(layer: Layer) -> float:
    """Largest relative error of the Triton layer against the reference, over the groups."""
    worst = 0.0
    for t in layer.tensors:
        ours, ref = torch.zeros_like(t.out), torch.zeros_like(t.out)
        triton_lora.lora_expand(
            triton_lora.lora_shrink(t.x, t.a_slots, layer.meta), t.b_slots, layer.meta, ours
        )
        reference.lora_expand(reference.lora_shrink(t.x, t.a_slots, layer.meta), t.b_slots, layer.meta, ref)
        worst = max(worst, float((ours.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)))
    return worst


def measure(point: Point, dtype: torch.dtype, dev: str = "cuda") -> Result:
    groups = layer_groups(point.model)
    layer = build_layer(groups, point, dtype, dev)
    steps = {"triton": triton_step, "reference": reference_step, "loop": loop_step}
    us = {name: time_graph(lambda step=step: step(layer)) for name, step in steps.items()}
    per_group = {g.name: time_graph(lambda g=g: triton_step(layer, only=g.name)) for g in groups}
    element = torch.finfo(dtype).bits // 8
    return Result(point, layer_bytes(groups, point, element), us, per_group, check_accuracy(layer))


SHRINK_TRIALS = [
    ShrinkConfig(block_k, split_k, num_stages=stages)
    for block_k in (128, 256)
    for split_k in (1, 2, 4, 9, 36)
    for stages in (1, 2, 3, 4)
]
EXPAND_TRIALS = [
    ExpandConfig(block_n, num_stages=stages) for block_n in (64, 128, 256) for stages in (1, 2, 3)
]


def tune(point: Point, dtype: torch.dtype, dev: str = "cuda") -> list[dict[str, str | float]]:
    """Per group: the launchers' default tiles against the fastest of a small grid of tiles."""
    groups = layer_groups(point.model)
    layer = build_layer(groups, point, dtype, dev)
    rows = []
    for g, t in zip(groups, layer.tensors, strict=True):
        y = triton_lora.lora_shrink(t.x, t.a_slots, layer.meta)
        shrink = functools.partial(triton_lora.lora_shrink, t.x, t.a_slots, layer.meta)
        expand = functools.partial(triton_lora.lora_expand, y, t.b_slots, layer.meta, t.out)
        for kernel, run, trials in (("shrink", shrink, SHRINK_TRIALS), ("expand", expand, EXPAND_TRIALS)):
            rows.append({"group": g.name, "kernel": kernel, **_best_tiles(run, trials)})
            print(rows[-1], flush=True)
    return rows


def _best_tiles(run: Callable[..., object], trials: list) -> dict[str, str | float]:
    timed = sorted((time_graph(functools.partial(run, config=c)), str(c)) for c in trials)
    default = time_graph(functools.partial(run, config=None))
    return {"default_us": round(default, 1), "best_us": round(timed[0][0], 1), "best": timed[0][1]}


def sweep(args: argparse.Namespace) -> list[Point]:
    if args.quick:
        return [Point("gemma-2-2b", 32, 32, 16)]
    return [
        Point(model, tokens, adapters, rank)
        for model in args.models
        for tokens in args.tokens
        for adapters in args.adapters
        for rank in args.ranks
        if adapters <= tokens  # a batch cannot hold more distinct adapters than tokens
    ]


def row(result: Result, copy_bw: float) -> dict[str, float | int | str]:
    p, us = result.point, result.us
    achieved = result.bytes / (us["triton"] * 1e-6)
    return {
        "model": p.model, "T": p.tokens, "adapters": p.adapters, "rank": p.rank,
        "MB": round(result.bytes / 1e6, 2), "floor_us": round(result.bytes / copy_bw * 1e6, 1),
        "triton_us": round(us["triton"], 1), "GB/s": round(achieved / 1e9), "copy%": round(100 * achieved / copy_bw, 1),
        "reference_us": round(us["reference"], 1), "loop_us": round(us["loop"], 1),
        "x_loop": round(us["loop"] / us["triton"], 1), "x_ref": round(us["reference"] / us["triton"], 1),
        "rel_err": f"{result.max_rel_error:.1e}",
    }  # fmt: skip


def headline(results: list[Result], copy_bw: float) -> str:
    hits = [r for r in results if r.point == Point("gemma-2-2b", 32, 32, 16)]
    if not hits:
        return "The headline point (Gemma-2-2B, T=32, 32 distinct rank-16 adapters) was not in this sweep."
    r, cells = hits[0], row(hits[0], copy_bw)
    share, speedup = cells["copy%"] / 100, cells["x_loop"]
    verdict = "met" if share >= TARGET_SHARE and speedup >= TARGET_SPEEDUP else "NOT met"
    groups = ", ".join(f"{k} {v:.1f} µs" for k, v in r.triton_groups_us.items())
    return (
        f"Gemma-2-2B layer, T=32, 32 distinct rank-16 adapters: {cells['triton_us']} µs for all 7 projections "
        f"({cells['copy%']}% of copy bandwidth, byte floor {cells['floor_us']} µs), {speedup}x the per-adapter "
        f"loop, {cells['x_ref']}x the torch reference. Target (>= {TARGET_SHARE:.0%} of copy bandwidth and "
        f">= {TARGET_SPEEDUP:g}x the loop): {verdict}. Per group: {groups}."
    )


def environment(copy_bw: float, dtype: str) -> dict[str, str | int]:
    return {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": dtype,
        "copy_GBps": round(copy_bw / 1e9),
    }


def write_reports(
    results: list[Result],
    copy_bw: float,
    env: dict,
    json_path: Path,
    md_path: Path,
    tuning: list[dict] | None = None,
) -> None:
    rows = [row(r, copy_bw) for r in results]
    payload = {"env": env, "rows": rows, "results": [asdict(r) for r in results], "tuning": tuning}
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(payload, indent=1) + "\n")
    md = [
        "# Batched-LoRA kernel benchmark",
        "",
        f"{env['gpu']}, {env['date']}, torch {env['torch']}, triton {env['triton']}, {env['dtype']}; "
        f"measured device copy bandwidth {env['copy_GBps']} GB/s. Produced by `python bench/kernels.py`.",
        "",
        "One layer's 7 LoRA projections (qkv, o, gate_up, down as 4 fused groups), each implementation "
        "captured in a CUDA graph and timed by replay (median, L2 flushed). `MB`: bytes that must move; "
        "`floor_us`: those bytes at copy bandwidth; `copy%`: the Triton kernels' share of it; `x_loop`, "
        "`x_ref`: speedup over the per-adapter loop (PEFT's way) and the torch gather+bmm reference.",
        "",
        headline(results, copy_bw),
        "",
        markdown_table(rows),
        "",
    ]
    if tuning:
        md += [
            "## Tiles at the headline point",
            "",
            "Each kernel alone (graph replay, median): the launchers' default tiles against the fastest "
            "of a small grid (`bench/kernels.py --tune`).",
            "",
            markdown_table(tuning),
            "",
        ]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=lambda s: s.split(","), default=list(CONFIGS))
    p.add_argument("--tokens", type=ints, default=[1, 8, 32, 128, 512])
    p.add_argument("--adapters", type=ints, default=[1, 8, 32])
    p.add_argument("--ranks", type=ints, default=[8, 16, 64])
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--quick", action="store_true", help="only the headline point")
    p.add_argument("--tune", action="store_true", help="also time a grid of tiles at the headline point")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "kernels.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks" / "kernels.md")
    args = p.parse_args(argv)
    unknown = set(args.models) - set(CONFIGS)
    if unknown:
        p.error(f"unknown models {sorted(unknown)}; known: {sorted(CONFIGS)}")
    if max(args.adapters) > NUM_SLOTS:
        p.error(f"at most {NUM_SLOTS} distinct adapters (GPU slots)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/kernels.py measures GPU kernels and needs a CUDA GPU; none is available "
              "(torch.cuda.is_available() is False). Nothing was measured or written.", file=sys.stderr)  # fmt: skip
        return 1
    torch.manual_seed(0)
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    results = []
    for point in sweep(args):
        results.append(measure(point, getattr(torch, args.dtype)))
        print(markdown_table([row(results[-1], copy_bw)]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    print(markdown_table([row(r, copy_bw) for r in results]))
    print(headline(results, copy_bw))
    tuning = tune(Point("gemma-2-2b", 32, 32, 16), getattr(torch, args.dtype)) if args.tune else None
    env = environment(copy_bw, args.dtype)
    write_reports(results, copy_bw, env, args.json, args.markdown, tuning)
    print(f"wrote {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
