"""Decode graphs: buckets, the static-buffer path against the eager one (CPU), capture and replay (GPU)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import pytest
import torch
from transformers import AutoTokenizer

from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.adapters.registry import AdapterEntry
from loraplex.server.cuda_graphs import decode_buckets
from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.model_runner import ModelRunner
from loraplex.server.request import GenerationRequest
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.sequence import AdapterRef
from loraplex.server.serve_cli import add_arguments, engine_config_kwargs

ADAPTERS = (None, "a4", "b8", "c16", None)
PROMPTS = ("def add(a, b):", "The quick brown fox jumps", "Hello", "import torch\nclass Model:", "x = 1")


def test_buckets_cover_every_batch_size_up_to_max_num_seqs() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(6) == (1, 2, 4, 6)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_buckets(36) == (1, 2, 4, 8, 16, 24, 32, 36)


def _engine(assets, kind: str, device: str, **runner_overrides: Any) -> LLMEngine:
    config = EngineConfig(
        model_path=str(assets.models[kind]), device=device, dtype="float32", max_loras=4, block_size=4,
        num_kv_blocks=256, max_lora_rank=16, max_num_seqs=8, max_batch_tokens=64,
    )  # fmt: skip
    runner = ModelRunner(dataclasses.replace(config.runner_config(), **runner_overrides))
    engine = LLMEngine(config, runner, AutoTokenizer.from_pretrained(str(runner.model_path)))
    for name, path in assets.adapters[kind].items():
        weights = load_peft_adapter(path, name, runner.hf_config, config.max_lora_rank)
        engine.add_adapter(AdapterEntry(AdapterRef(name, 0), weights, source=str(path)))
    return engine


def _generate(engine: LLMEngine, tokenizer) -> tuple[dict[str, list[int]], dict[str, list[float]]]:
    """Five requests (a decode batch of 5 pads to bucket 8), two of them joining mid-decode."""
    pending = [
        GenerationRequest(
            f"r{i}",
            tuple(tokenizer.encode(text)),
            SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=True),
            adapter,
        )
        for i, (text, adapter) in enumerate(zip(PROMPTS, ADAPTERS, strict=True))
    ]
    for request in pending[:3]:
        engine.add_request(request)
    tokens: dict[str, list[int]] = {}
    logprobs: dict[str, list[float]] = {}
    steps = 0
    while engine.has_unfinished() or steps < 4:
        if steps == 3:
            for request in pending[3:]:
                engine.add_request(request)
        for event in engine.step():
            if event.token_id is not None:
                tokens.setdefault(event.request_id, []).append(event.token_id)
                logprobs.setdefault(event.request_id, []).append(event.logprob)
        steps += 1
    return tokens, logprobs


def _count_static_steps(engine: LLMEngine) -> list[int]:
    calls: list[int] = []
    run = engine.runner.graphs.run

    def counted(chunks, bucket, *args):
        calls.append(bucket)
        return run(chunks, bucket, *args)

    engine.runner.graphs.run = counted
    return calls


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_static_buffer_decode_gives_the_tokens_of_the_eager_path(kind, tiny_assets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    eager = _engine(tiny_assets, kind, "cpu")
    static = _engine(tiny_assets, kind, "cpu", static_decode=True)
    assert eager.runner.graphs is None and static.runner.graphs is not None
    assert static.runner.graphs.num_graphs == 0  # nothing is captured on the CPU
    buckets = _count_static_steps(static)
    want_tokens, want_logprobs = _generate(eager, tokenizer)
    got_tokens, got_logprobs = _generate(static, tokenizer)
    assert got_tokens == want_tokens
    for rid, values in want_logprobs.items():
        assert got_logprobs[rid] == pytest.approx(values, abs=1e-5)
    assert {4, 8} <= set(buckets)  # 3 decodes padded to 4, then 5 padded to 8


def test_cuda_graphs_flag_reaches_the_runner(monkeypatch: pytest.MonkeyPatch, tiny_assets) -> None:
    """`--cuda-graphs false` / CUDA_GRAPHS=false (what the operator renders) -> EngineConfig -> RunnerConfig."""
    monkeypatch.setenv("CUDA_GRAPHS", "false")
    parser = argparse.ArgumentParser()
    add_arguments(parser)  # reads the environment now
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    kwargs = engine_config_kwargs(parser.parse_args([]), known)
    assert kwargs["cuda_graphs"] is False
    assert engine_config_kwargs(parser.parse_args(["--cuda-graphs", "true"]), known)["cuda_graphs"] is True
    config = EngineConfig(model_path=str(tiny_assets.models["llama"]), **kwargs)
    assert config.runner_config().cuda_graphs is False
    engine = _engine(tiny_assets, "llama", "cpu")  # cuda_graphs defaults to True: still no graphs on the CPU
    assert engine.config.cuda_graphs and engine.runner.graphs is None


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_graph_replay_gives_the_tokens_of_eager_on_cuda(kind, dtype, tiny_assets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    eager = _engine(tiny_assets, kind, "cuda", cuda_graphs=False, dtype=dtype)
    graphed = _engine(tiny_assets, kind, "cuda", dtype=dtype)
    assert eager.runner.graphs is None
    assert graphed.runner.graphs.num_graphs == 2 * len(decode_buckets(8))  # with and without LoRA
    buckets = _count_static_steps(graphed)
    want_tokens, want_logprobs = _generate(eager, tokenizer)
    got_tokens, got_logprobs = _generate(graphed, tokenizer)
    assert got_tokens == want_tokens
    tolerance = 1e-4 if dtype == "float32" else 5e-2
    for rid, values in want_logprobs.items():
        assert got_logprobs[rid] == pytest.approx(values, abs=tolerance)
    assert {4, 8} <= set(buckets)
