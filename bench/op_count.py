"""Device ops per decoder layer and blocking syncs of one decode step, counted on the CPU.

A random-weight model with the layer structure of Gemma-2-2B or Mistral-7B (bench/configs:
same layer count, norms, activation, GQA ratio, sliding windows; hidden sizes shrunk so it runs
in seconds) decodes one step of `--batch` sequences on `--adapters` distinct rank-16 adapters
(all 7 projections; sequence i uses adapter i % adapters) through the engine's `ModelRunner`
with the GPU code path selected: Triton kernels for LoRA and attention, run by Triton's
interpreter. `loraplex.kernels.op_count.OpCounter` counts what a GPU would launch (non-view
aten ops + Triton launches) inside each decoder layer and outside them, and the blocking syncs.
On the CPU, host-side torch work outside the layers counts as device ops too (see op_count).

    python bench/op_count.py                       # both layouts, batch 32, 32 adapters, H100 configs
    python bench/op_count.py --layers 2 --sms 4    # quicker: per-layer counts are the same in every layer
    python bench/op_count.py --layout gemma-2-2b --batch 4 --json /tmp/ops.json

The launch configs depend on the GPU's SM count and the widths (split-K in the LoRA shrink,
split attention): `--sms` picks the GPU to count for, and `--real-widths` keeps the layout's
hidden sizes (vocab still 512) so the count is the GPU's; small widths never split K.

    python bench/op_count.py --real-widths --layers 2 --batch 32 --adapters 32   # H100 launch counts
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import random_checkpoint  # bench/ is sys.path[0] when run as a script
import torch
from benchutil import git_commit, markdown_table

from loraplex.kernels.op_count import OpCounter
from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_runner import ModelRunner, RunnerConfig

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = {
    "gemma-2-2b": ROOT / "bench" / "configs" / "gemma-2-2b-config.json",
    "mistral-7b": ROOT / "bench" / "configs" / "mistral-7b-v0.1-config.json",
}
# The GPU code path, set before the runner is built (the engine reads these).
GPU_PATH_ENV = {"LORAPLEX_KERNELS": "triton", "LORAPLEX_ATTENTION": "triton", "TRITON_INTERPRET": "1"}
RANK = 16
BLOCK_SIZE = 16


def shrunk_config(path: Path, real_widths: bool = False) -> dict:
    """The layout's config with vocab 512 and, unless `real_widths`, small widths: 4 query heads
    of 16, the same GQA ratio. Launch configs (split-K, attention splits) depend on the widths."""
    config = random_checkpoint.read_config(path)
    config["vocab_size"] = 512
    if real_widths:
        return config
    kv_ratio = config["num_key_value_heads"] / config["num_attention_heads"]
    config.update(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, head_dim=16,
        num_key_value_heads=max(1, round(4 * kv_ratio)),
    )  # fmt: skip
    if "query_pre_attn_scalar" in config:
        config["query_pre_attn_scalar"] = 16
    return config


def build_runner(
    layout: str, adapters: int, layers: int | None, real_widths: bool, work: Path
) -> ModelRunner:
    """A float32 CPU runner of the shrunk layout with `adapters` random adapters in slots 0.."""
    config = shrunk_config(LAYOUTS[layout], real_widths)
    if layers is not None:
        config["num_hidden_layers"] = layers
    config_path = work / f"{layout}.json"
    config_path.write_text(json.dumps(config))
    spec = random_checkpoint.CheckpointSpec(config_path, work / layout, dtype=torch.float32)
    adapter_dirs = random_checkpoint.ensure_checkpoint(spec, adapters, RANK)
    runner = ModelRunner(
        RunnerConfig(
            model_path=str(spec.out), block_size=BLOCK_SIZE, num_kv_blocks=1024,
            max_loras=max(1, adapters), max_lora_rank=RANK,
        )
    )  # fmt: skip
    for slot, path in enumerate(adapter_dirs):
        runner.load_lora(slot, load_peft_adapter(path, f"a{slot}", runner.hf_config, RANK))
    return runner


def decode_batch(batch: int, adapters: int, context: int) -> ForwardBatch:
    """`batch` sequences of `context` tokens (the last one new), disjoint block tables."""
    blocks = -(-context // BLOCK_SIZE)
    chunks = tuple(
        SequenceChunk(
            seq_id=i, token_ids=(i + 1,), num_cached_tokens=context - 1,
            block_table=tuple(range(i * blocks, (i + 1) * blocks)),
            lora_slot=i % adapters if adapters else None,
        )
        for i in range(batch)
    )  # fmt: skip
    return ForwardBatch(chunks)


def fast_interpreter() -> None:
    """Skip the interpreter's integer-overflow checks (half its time here; the tests keep them)."""
    from triton.runtime import interpreter

    options = interpreter.interpreter_builder.options
    interpreter.interpreter_builder.options = dataclasses.replace(options, sanitize_overflow=False)


def emulate_sms(count: int) -> None:
    """Launch configs as on a GPU with `count` SMs (split-K, attention splits change the launch count)."""
    from loraplex.kernels import triton_common

    triton_common.num_sms = lambda device: count


def count_step(runner: ModelRunner, batch: ForwardBatch) -> OpCounter:
    """Count one `runner.execute`, with a scope per decoder layer ("layer.<i>")."""
    counter = OpCounter()
    scopes: dict[int, contextlib.ExitStack] = {}

    def enter(index: int):
        def hook(module, args):
            scopes[index] = contextlib.ExitStack()
            scopes[index].enter_context(counter.scope(f"layer.{index}"))

        return hook

    def leave(index: int):
        return lambda module, args, out: scopes.pop(index).close()

    layers = runner.model.model.layers
    handles = [layer.register_forward_pre_hook(enter(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(leave(i)) for i, layer in enumerate(layers)]
    try:
        runner.execute(batch)  # warm-up: the interpreter rewrites each kernel once
        with counter:
            runner.execute(batch)
    finally:
        for handle in handles:
            handle.remove()
    return counter


def summarise(layout: str, counter: OpCounter, num_layers: int) -> dict:
    per_layer = [counter.scopes[f"layer.{i}"].num_ops for i in range(num_layers)]
    in_layers = Counter()
    for i in range(num_layers):
        in_layers.update(counter.scopes[f"layer.{i}"].ops)
    return {
        "layout": layout,
        "layers": num_layers,
        "ops_per_layer_min": min(per_layer),
        "ops_per_layer_max": max(per_layer),
        "triton_per_layer_max": max(
            counter.scopes[f"layer.{i}"].num_triton_launches for i in range(num_layers)
        ),
        "ops_outside_layers": counter.total.num_ops - sum(per_layer),
        "ops_total": counter.total.num_ops,
        "syncs": counter.total.num_syncs,
        "sync_kinds": dict(counter.total.syncs),
        "layer_ops": {name: n / num_layers for name, n in in_layers.most_common()},
    }


def report(env: dict, summaries: list[dict]) -> str:
    lines = [
        f"# Device ops of one decode step (counted on the CPU, {env['date']}, commit {env['commit']})",
        "",
        f"Batch {env['batch']}, {env['adapters']} distinct rank-{RANK} adapters, context {env['context']}; "
        f"{env['widths']} widths, launch configs of a {env['sms']}-SM GPU; `bench/op_count.py` on {env['cpu']} "
        "(Triton kernels in the interpreter; counts do not depend on the machine).",
        "",
        markdown_table([{k: v for k, v in s.items() if k != "layer_ops"} for s in summaries]),
    ]
    for s in summaries:
        lines += ["", f"## {s['layout']}: device ops in one layer", ""]
        lines.append(markdown_table([{"op": name, "count": n} for name, n in s["layer_ops"].items()]))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters (0: base model only)")
    p.add_argument("--context", type=int, default=64, help="tokens per sequence, the new one included")
    p.add_argument("--layers", type=int, help="decoder layers (default: the layout's own count)")
    p.add_argument(
        "--real-widths", action="store_true", help="the layout's own hidden sizes: GPU launch configs"
    )
    p.add_argument(
        "--sms", type=int, default=132, help="SMs of the GPU whose launch configs to use (H100: 132)"
    )
    p.add_argument("--json", type=Path, help="also write the summaries here")
    p.add_argument("--markdown", type=Path, help="also write the report here")
    args = p.parse_args(argv)
    os.environ.update(GPU_PATH_ENV)
    torch.set_num_threads(1)
    fast_interpreter()
    emulate_sms(args.sms)
    summaries = []
    with tempfile.TemporaryDirectory(prefix="loraplex-ops-") as work:
        for layout in LAYOUTS if args.layout == "all" else (args.layout,):
            runner = build_runner(layout, args.adapters, args.layers, args.real_widths, Path(work))
            counter = count_step(runner, decode_batch(args.batch, args.adapters, args.context))
            summaries.append(summarise(layout, counter, runner.num_layers))
    env = {
        "batch": args.batch, "adapters": args.adapters, "context": args.context, "sms": args.sms,
        "widths": "real" if args.real_widths else "small", "commit": git_commit(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d"), "cpu": platform.processor() or platform.machine(),
    }  # fmt: skip
    text = report(env, summaries)
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "layouts": summaries}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
