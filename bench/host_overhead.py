"""Host work per decode step, by part, on a tiny model where the model itself costs next to nothing.

A decode step's host work (everything but the model's own forward and logits) is what a GPU
waits for between steps. This runs the real `LLMEngine` on a random-weight model with hidden
size 64 (Llama layout, 16 layers; Gemma-2 layout, 26 layers, sliding window), `batch`
requests over 32 distinct rank-16 adapters (all 7 projections), each at `context` tokens, and
times every decode step by part:

- `schedule`: `Scheduler.schedule`; `fwd_batch`: `LLMEngine._forward_batch` (the scheduler's plan
  as a `ForwardBatch`); `prepare`: `ModelRunner.execute` minus the model (step metadata,
  input copies); `sample`: the sampler; `post`: the rest of `_postprocess` (stop checks,
  events; detokenisation too for `--inline-text`); `commit`: `Scheduler.update_after_step`;
  on a steady decode step (the same sequences as the step before, `server/steady_decode.py`)
  the same parts are `LLMEngine._schedule_steady`, `_decode_step`, `ModelRunner.execute_decode`,
  `Sampler.sample_ids`, `_postprocess_decode` and `Scheduler.commit_decodes`;
  `other`: what is left of `step()` (slot updates, observers); `host`: all of it, i.e. the step
  minus `model` (median; `host_min`: the least of the steps; `host_bare`: the median `host` of as
  many more steps timed with no per-part timer, only the model's, since each timer costs a few
  microseconds too). `text`: what the server's fan-out thread does after the step, not part of
  `host`: the detokenisation (`LLMEngine.defer_text`) and, for a steady step, the expansion of its
  one `TokenBatch` into per-request events.

The step is timed as `AsyncEngine`'s engine thread runs it: `LLMEngine.step_outputs` (events,
or a `TokenBatch`), text deferred, inside `torch.inference_mode()` (that thread stays in it).
An engine without `step_outputs` (an older commit) is timed through `step()`, as before.

Prefill runs with the model's forward replaced by zeros (the cache content does not change
what a decode step's host side does, and long prefills of 64 x 2000 tokens would take
minutes on a shared CPU); every timed decode step runs the real model.

    python bench/host_overhead.py                  # both layouts, batch 1/8/32/64 x context 64/512/1024/2000
    python bench/host_overhead.py --quick          # batch 32, context 512 only (the issue-14 target)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path

import random_checkpoint  # bench/ is sys.path[0] when run as a script
import torch
from benchutil import cpu_model, git_commit, load_average, load_note, markdown_table

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path("/tmp/loraplex-bench/host-overhead")
NUM_ADAPTERS = 32
RANK = 16
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 512}  # fmt: skip
LAYOUTS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 16,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu", "tie_word_embeddings": True,
              "max_position_embeddings": 4096},
    "gemma2": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "num_hidden_layers": 26,
               "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "hidden_activation": "gelu_pytorch_tanh",
               "query_pre_attn_scalar": 16, "sliding_window": 256, "attn_logit_softcapping": 50.0,
               "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "max_position_embeddings": 4096},
}  # fmt: skip
TARGETS_MS = {"llama": 0.3, "gemma2": 0.4}  # issue 14, batch 32, context 512
PARTS = (
    "schedule",
    "fwd_batch",
    "prepare",
    "sample",
    "post",
    "commit",
    "other",
    "host",
    "host_min",
    "host_bare",
    "model",
    "text",
)


def checkpoint(layout: str) -> tuple[Path, list[Path]]:
    out = CACHE / layout
    config_path = CACHE / f"{layout}-config.json"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(json.dumps({**TINY, **LAYOUTS[layout]}))
    spec = random_checkpoint.CheckpointSpec(config_path, out, torch.float32, 0, "cpu")
    return out, random_checkpoint.ensure_checkpoint(spec, NUM_ADAPTERS, RANK)


def build_engine(
    model_dir: Path, adapter_dirs: list[Path], max_batch: int, max_context: int, cuda_graphs: bool
):
    from loraplex.server.adapters.registry import AdapterEntry
    from loraplex.server.async_engine import load_local_adapter
    from loraplex.server.engine import EngineConfig, LLMEngine
    from loraplex.server.engine_api import LoadAdapterSpec
    from loraplex.server.sequence import AdapterRef

    total = max_context + 128  # room for max_new_tokens (steps + 40): the engine validates the sum
    fields = {
        "model_path": str(model_dir), "dtype": "float32", "device": "cpu", "max_loras": NUM_ADAPTERS,
        "max_lora_rank": RANK, "max_num_seqs": max_batch, "max_batch_tokens": 4096,
        "max_total_tokens": total, "max_input_tokens": max_context,
        "num_kv_blocks": math.ceil(total / 16) * max_batch + 8, "enable_prefix_caching": False,
    }  # fmt: skip
    if "cuda_graphs" in EngineConfig.__dataclass_fields__:
        fields["cuda_graphs"] = cuda_graphs
    engine = LLMEngine.from_config(EngineConfig(**fields))
    for i, path in enumerate(adapter_dirs):
        spec = LoadAdapterSpec(name=f"a{i}", source=str(path))
        weights = load_local_adapter(spec, engine.runner.hf_config, RANK)
        engine.add_adapter(AdapterEntry(ref=AdapterRef(spec.name, 0), weights=weights, source=spec.source))
    return engine


class Timers:
    """Wraps methods of live objects (instance attributes shadow the class's) and sums their time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._undo: list[tuple[object, str, object]] = []

    def wrap(self, name: str, obj: object, attr: str) -> None:
        inner = getattr(obj, attr)
        self._undo.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, _Timed(inner, name, self.seconds))

    def reset(self) -> None:
        self.seconds.clear()

    def undo(self) -> None:
        for obj, attr, original in reversed(self._undo):
            if original is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, original)
        self._undo.clear()


_MISSING = object()


class _Timed:
    """A callable (method or object) that adds its call time to `seconds[name]`; other attributes pass through."""

    def __init__(self, inner, name: str, seconds: dict[str, float]) -> None:
        self._inner, self._name, self._seconds = inner, name, seconds

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self._seconds[self._name] += time.perf_counter() - start

    def __getattr__(self, attr: str):
        return getattr(self._inner, attr)


def _zero_forward(model):
    def forward(input_ids, *args, **kwargs):
        return torch.zeros(input_ids.shape[0], model.config.hidden_size)

    return forward


def _requests(batch: int, context: int, vocab: int, steps: int) -> list:
    from loraplex.server.request import GenerationRequest
    from loraplex.server.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(batch * 7919 + context)
    params = SamplingParams(max_new_tokens=steps + 40, ignore_eos=True)
    return [
        GenerationRequest(
            request_id=f"r{batch}-{context}-{i}",
            prompt_token_ids=tuple(torch.randint(0, vocab, (context,), generator=gen).tolist()),
            params=params,
            adapter=f"a{i % NUM_ADAPTERS}",
        )
        for i in range(batch)
    ]


def measure(engine, batch: int, context: int, steps: int, warmup: int, inline_text: bool) -> dict[str, float]:
    """Median ms per part over `steps` decode steps of `batch` sequences at ~`context` tokens."""
    requests = _requests(batch, context, engine.runner.vocab_size, 2 * steps + warmup)
    for request in requests:
        engine.add_request(request)
    started: set[str] = set()
    engine.runner.model.forward = _zero_forward(engine.runner.model)
    try:
        while len(started) < batch:
            started.update(event.request_id for event in engine.step())  # prefill: per-request events
    finally:
        del engine.runner.model.forward
    complete = _text_completion(engine, inline_text)
    # The step as `AsyncEngine` runs it: a steady decode step hands out its events as one batch
    # object, which the fan-out thread expands (timed in `text`, with the detokenisation).
    step = getattr(engine, "step_outputs", engine.step)
    for _ in range(warmup):
        complete(step(), engine.take_text_jobs())
    timers = Timers()
    # The general path's parts and, where the engine has it, the steady decode path's.
    for part, obj, attrs in (
        ("schedule", engine.scheduler, ("schedule",)),
        ("schedule", engine, ("_schedule_steady",)),
        ("batch", engine, ("_forward_batch", "_decode_step")),
        ("execute", engine.runner, ("execute", "execute_decode")),
        ("model", engine.runner.model, ("forward",)),
        ("logits", engine.runner.model, ("compute_logits",)),
        ("postprocess", engine, ("_postprocess", "_postprocess_decode")),
        ("sample", engine.sampler, ("sample_ids",)),
        ("sample", engine, ("sampler",)),
        ("commit", engine.scheduler, ("update_after_step",)),
        ("commit_in_post", engine.scheduler, ("commit_decodes",)),  # the steady path commits in `post`
    ):
        for attr in attrs:
            if hasattr(obj, attr):
                timers.wrap(part, obj, attr)
    samples: dict[str, list[float]] = defaultdict(list)
    # AsyncEngine's engine thread runs in inference mode throughout (the runner then does not
    # enter it per step); this loop stands in for that thread.
    thread_mode = torch.inference_mode() if hasattr(engine, "step_outputs") else contextlib.nullcontext()
    try:
        with thread_mode:
            for _ in range(steps):
                timers.reset()
                start = time.perf_counter()
                events = step()
                total = time.perf_counter() - start
                num_rows = sum(getattr(e, "num_rows", 1) for e in events)  # a TokenBatch holds many
                if num_rows != batch:
                    raise RuntimeError(f"a step decoded {num_rows} sequences, not {batch}")
                start = time.perf_counter()
                complete(events, engine.take_text_jobs())
                samples["text"].append((time.perf_counter() - start) * 1e3)
                for name, value in _parts(timers.seconds, total).items():
                    samples[name].append(value * 1e3)
            timers.undo()
            samples["host_bare"] = _bare_host(engine, step, complete, steps, batch)
    finally:
        timers.undo()
        for request in requests:
            engine.abort(request.request_id)
        engine.take_text_jobs()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    return medians | {"host_min": min(samples["host"])}


def _bare_host(engine, step, complete, steps: int, batch: int) -> list[float]:
    """`host` of `steps` more steps with only the model's own two methods timed (no per-part timers)."""
    timers = Timers()
    timers.wrap("model", engine.runner.model, "forward")
    timers.wrap("logits", engine.runner.model, "compute_logits")
    hosts = []
    try:
        for _ in range(steps):
            timers.reset()
            start = time.perf_counter()
            events = step()
            total = time.perf_counter() - start
            if sum(getattr(e, "num_rows", 1) for e in events) != batch:
                raise RuntimeError(f"a step did not decode all {batch} sequences")
            complete(events, engine.take_text_jobs())
            hosts.append((total - timers.seconds["model"] - timers.seconds["logits"]) * 1e3)
    finally:
        timers.undo()
    return hosts


def _text_completion(engine, inline_text: bool):
    """Defer detokenisation as AsyncEngine does; engines from before text deferral detokenise inline."""
    if not hasattr(engine, "take_text_jobs"):
        engine.take_text_jobs = list
        return lambda events, jobs: events
    from loraplex.server.text_fanout import complete

    engine.defer_text = not inline_text
    return complete


def _parts(s: dict[str, float], total: float) -> dict[str, float]:
    model = s["model"] + s["logits"]
    named = {
        "schedule": s["schedule"],
        "fwd_batch": s["batch"],
        "prepare": s["execute"] - model,
        "sample": s["sample"],
        "post": s["postprocess"] - s["sample"] - s["commit_in_post"],
        "commit": s["commit"] + s["commit_in_post"],
    }
    named["other"] = total - model - sum(named.values())
    return {**named, "host": total - model, "model": model}


def run(
    layouts: list[str],
    batches: list[int],
    contexts: list[int],
    steps: int,
    cuda_graphs: bool,
    inline_text: bool,
) -> list[dict]:
    rows = []
    for layout in layouts:
        model_dir, adapter_dirs = checkpoint(layout)
        engine = build_engine(model_dir, adapter_dirs, max(batches), max(contexts), cuda_graphs)
        for context in contexts:
            for batch in batches:
                ms = measure(engine, batch, context, steps, warmup=3, inline_text=inline_text)
                row = {"layout": layout, "batch": batch, "context": context}
                row.update({part: round(ms[part], 3) for part in PARTS})
                rows.append(row)
                print(json.dumps(row), flush=True)
        del engine
    return rows


def write_results(rows: list[dict], out: Path, label: str, env: dict | None = None) -> None:
    env = env or {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": load_average(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    parts = ("schedule", "fwd_batch", "prepare", "sample", "post", "commit", "other")
    targets = [
        f"- {layout}, batch 32, context 512: host {r['host']} ms median, {r.get('host_min', '-')} ms the "
        f"least of the steps, {round(sum(r[p] for p in parts), 3)} ms the sum of the parts' medians "
        f"(target <= {TARGETS_MS[layout]} ms)"
        for layout in TARGETS_MS
        for r in rows
        if r["layout"] == layout and r["batch"] == 32 and r["context"] == 512
    ]
    text = "\n".join(
        [
            f"# Host work per decode step ({label})",
            "",
            f"{env['date']}, commit {env['commit']}, {env['cpu']}, torch {env['torch']}, "
            f"{env['threads']} intra-op thread(s). {load_note(env.get('load_average'))} Figures are medians.",
            "",
            "Command: `python bench/host_overhead.py` (see its docstring for what each part is). "
            "Milliseconds per decode step, median; 32 distinct rank-16 adapters.",
            "",
            *targets,
            "",
            markdown_table(rows),
            "",
        ]
    )
    out.with_suffix(".md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="batch 32, context 512 only")
    p.add_argument("--layouts", default="llama,gemma2")
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--contexts", default="64,512,1024,2000")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--inline-text", action="store_true", help="detokenise inside the step (LLMEngine default)"
    )
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "host_overhead")
    p.add_argument("--label", default="CPU")
    p.add_argument("--rewrite", action="store_true", help="only rewrite the .md from the .json at --out")
    args = p.parse_args(argv)
    if args.rewrite:
        saved = json.loads(args.out.with_suffix(".json").read_text())
        write_results(saved["rows"], args.out, args.label, saved["env"])
        return 0
    torch.set_num_threads(args.threads)
    batches = [32] if args.quick else [int(b) for b in args.batches.split(",")]
    contexts = [512] if args.quick else [int(c) for c in args.contexts.split(",")]
    rows = run(args.layouts.split(","), batches, contexts, args.steps, False, args.inline_text)
    write_results(rows, args.out, args.label)
    print(f"wrote {args.out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
