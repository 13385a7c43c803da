"""Benchmark of decode attention over the paged KV cache at Gemma-2-2B shapes (GPU only).

One layer's decode step (8 query heads on 4 KV heads, head_dim 256, logit softcap 50, scale
`query_pre_attn_scalar**-0.5`; bench/configs) for every batch size B and context length S:
every sequence holds S tokens in blocks of 16 scattered over the cache (shuffled block
tables) and decodes one. Timed, each captured in a CUDA graph and replayed (median, L2 flushed):

- kernel: `loraplex.kernels.paged_attention.paged_decode_attention` alone;
- triton: the engine's `PagedAttention` layer with LORAPLEX_ATTENTION=triton (stores the new
  K/V into the cache, then the kernel);
- torch:  the same layer with LORAPLEX_ATTENTION=torch (stores, gathers every context out of the
  cache, softcapped matmul-softmax-matmul), the engine's CPU path.

Bytes that must move: every context's K and V once, q read and the output written. The kernel's
achieved bandwidth is compared with the measured device-to-device copy bandwidth. Gemma-2-2B's
sliding window (4096) covers every context here, so its local layers cost the same as these.

    python bench/attention.py           # full sweep, writes docs/benchmarks/attention.{md,json}
    python bench/attention.py --quick   # B=32, S=1024 only
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from benchutil import copy_bandwidth, markdown_table

from loraplex.kernels import paged_attention
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.layers.attention import ATTENTION_ENV, PagedAttention
from loraplex.server.layers.metadata import ForwardMetadata, build_forward_metadata

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "bench" / "configs" / "gemma-2-2b-config.json"
BLOCK_SIZE = 16
Timer = Callable[[Callable[[], object]], float]  # µs of one call


@dataclass(frozen=True)
class Shapes:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scale: float
    softcap: float | None

    @classmethod
    def from_config(cls, path: Path = CONFIG) -> Shapes:
        c = json.loads(path.read_text())
        scale = c.get("query_pre_attn_scalar", c["head_dim"]) ** -0.5
        return cls(
            c["num_attention_heads"],
            c["num_key_value_heads"],
            c["head_dim"],
            scale,
            c.get("attn_logit_softcapping"),
        )


@dataclass(frozen=True)
class Point:
    batch: int
    context: int  # tokens per sequence after this step (S - 1 cached + 1 new)


@dataclass
class Result:
    point: Point
    bytes: int
    us: dict[str, float]  # kernel, triton, torch
    rel_error: float  # triton layer against the torch layer


@dataclass
class Case:
    """One decode step of one layer: inputs, the paged cache and the engine's metadata for it."""

    layer: PagedAttention
    q: torch.Tensor  # [B, heads, D]
    k: torch.Tensor  # [B, kv_heads, D] (the new token's)
    v: torch.Tensor
    kv_cache: tuple[torch.Tensor, torch.Tensor]
    meta: ForwardMetadata

    def run_layer(self, backend: str) -> torch.Tensor:
        os.environ[ATTENTION_ENV] = backend  # read when the graph is captured, not at replay
        return self.layer(self.q, self.k, self.v, self.kv_cache, self.meta)

    def run_kernel(self) -> torch.Tensor:
        (group,) = self.meta.attention_groups
        spec = paged_attention.AttentionSpec(self.layer.scale, self.layer.softcap, self.layer.sliding_window)
        return paged_attention.paged_decode_attention(
            self.q, self.kv_cache, group.block_tables, group.context_lens, spec
        )


def build_case(shapes: Shapes, point: Point, dtype: torch.dtype, device: str) -> Case:
    blocks_per_seq = -(-point.context // BLOCK_SIZE)
    num_blocks = point.batch * blocks_per_seq
    order = list(range(num_blocks))
    random.Random(0).shuffle(order)  # scattered blocks, as after many requests came and went
    chunks = tuple(
        SequenceChunk(
            b, (0,), point.context - 1, tuple(order[b * blocks_per_seq : (b + 1) * blocks_per_seq]), None
        )
        for b in range(point.batch)
    )
    meta = build_forward_metadata(
        ForwardBatch(chunks), BLOCK_SIZE, (None,), torch.zeros(1, dtype=torch.int32), torch.device(device)
    )
    cache_shape = (num_blocks, BLOCK_SIZE, shapes.num_kv_heads, shapes.head_dim)
    kv_cache = tuple(torch.randn(cache_shape, device=device).to(dtype) for _ in range(2))
    new = lambda heads: torch.randn(point.batch, heads, shapes.head_dim, device=device).to(dtype)  # noqa: E731
    layer = PagedAttention(
        shapes.num_heads, shapes.num_kv_heads, shapes.head_dim, shapes.scale, softcap=shapes.softcap
    )
    return Case(
        layer, new(shapes.num_heads), new(shapes.num_kv_heads), new(shapes.num_kv_heads), kv_cache, meta
    )


def decode_bytes(shapes: Shapes, point: Point, element: int) -> int:
    """K and V of every context once, q read, the output written (block tables are negligible)."""
    kv = 2 * point.batch * point.context * shapes.num_kv_heads * shapes.head_dim
    q_out = 2 * point.batch * shapes.num_heads * shapes.head_dim
    return (kv + q_out) * element


def time_graph(fn: Callable[[], object]) -> float:
    """Median µs of replaying `fn` captured in a CUDA graph."""
    import triton.testing

    fn()  # compile and allocate outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    ms = triton.testing.do_bench(graph.replay, warmup=25, rep=100, return_mode="median")
    del graph
    return ms * 1e3


def measure(
    shapes: Shapes, point: Point, dtype: torch.dtype, device: str = "cuda", timer: Timer = time_graph
) -> Result:
    case = build_case(shapes, point, dtype, device)
    previous = os.environ.get(ATTENTION_ENV)
    try:
        expected = case.run_layer("torch").double()
        got = case.run_layer("triton").double()
        us = {
            "kernel": timer(case.run_kernel),
            "triton": timer(lambda: case.run_layer("triton")),
            "torch": timer(lambda: case.run_layer("torch")),
        }
    finally:
        if previous is None:
            os.environ.pop(ATTENTION_ENV, None)
        else:
            os.environ[ATTENTION_ENV] = previous
    rel_error = float((got - expected).norm() / expected.norm())
    return Result(point, decode_bytes(shapes, point, dtype.itemsize), us, rel_error)


def row(result: Result, copy_bw: float) -> dict[str, float | int | str]:
    p, us = result.point, result.us
    achieved = result.bytes / (us["kernel"] * 1e-6)
    return {
        "B": p.batch, "S": p.context, "MB": round(result.bytes / 1e6, 2),
        "floor_us": round(result.bytes / copy_bw * 1e6, 1), "kernel_us": round(us["kernel"], 1),
        "GB/s": round(achieved / 1e9), "copy%": round(100 * achieved / copy_bw, 1),
        "triton_layer_us": round(us["triton"], 1), "torch_layer_us": round(us["torch"], 1),
        "x_torch": round(us["torch"] / us["triton"], 1), "rel_err": f"{result.rel_error:.1e}",
    }  # fmt: skip


def write_reports(results: list[Result], copy_bw: float, dtype: str, json_path: Path, md_path: Path) -> None:
    env = {
        "gpu": torch.cuda.get_device_name(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "dtype": dtype,
        "copy_GBps": round(copy_bw / 1e9),
    }
    rows = [row(r, copy_bw) for r in results]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(
        json.dumps({"environment": env, "results": [asdict(r) for r in results], "rows": rows}, indent=1)
    )
    md = [
        "# Decode attention over the paged KV cache (Gemma-2-2B, one layer)",
        "",
        "Generated by `python bench/attention.py` on " + ", ".join(f"{k}: {v}" for k, v in env.items()) + ".",
        "",
        "B sequences of S tokens each (blocks of 16, shuffled), one decode token each; 8 heads on 4 KV heads, "
        "head_dim 256, softcap 50. Each timing is a CUDA-graph replay (median, L2 flushed). `MB`: K/V of every "
        "context + q + output; `floor_us`: MB at the copy bandwidth; `kernel_us`: the Triton decode kernel "
        "alone; `*_layer_us`: the engine's attention layer (K/V store + attention) with each backend; "
        "`rel_err`: Triton layer against the torch layer.",
        "",
        markdown_table(rows),
        "",
    ]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(md))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=ints, default=[1, 8, 32, 64])
    p.add_argument("--contexts", type=ints, default=[128, 512, 1024, 2048, 4096])
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    p.add_argument("--quick", action="store_true", help="B=32, S=1024 only")
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "attention.json")
    p.add_argument("--markdown", type=Path, default=ROOT / "docs" / "benchmarks" / "attention.md")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench/attention.py measures GPU kernels and needs a CUDA GPU; none is available "
              "(torch.cuda.is_available() is False). Nothing was measured or written.", file=sys.stderr)  # fmt: skip
        return 1
    torch.manual_seed(0)
    shapes, dtype = Shapes.from_config(), getattr(torch, args.dtype)
    points = [Point(32, 1024)] if args.quick else [Point(b, s) for b in args.batches for s in args.contexts]
    copy_bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {copy_bw / 1e9:.0f} GB/s", flush=True)
    results = []
    for point in points:
        results.append(measure(shapes, point, dtype))
        print(markdown_table([row(results[-1], copy_bw)]).splitlines()[-1], flush=True)
        torch.cuda.empty_cache()
    print(markdown_table([row(r, copy_bw) for r in results]))
    write_reports(results, copy_bw, args.dtype, args.json, args.markdown)
    print(f"wrote {args.markdown} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
