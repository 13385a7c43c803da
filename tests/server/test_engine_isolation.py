"""One request's failure ends that request only (issue 15): the others keep their exact tokens.

Each test runs a batch of greedy requests twice, once quiet and once with one request made to
fail in the step (non-finite logits, a forward pass that fails while it is batched, a sampler
or detokenizer error), and compares every other request's tokens with the quiet run.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_support import add_tiny_adapters
from transformers import AutoTokenizer

from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sampling_params import SamplingParams

TEXTS = ("def add(a, b):", "The quick brown fox", "Hello", "import torch\nclass Model:")
ADAPTERS = (None, "a4", "b8", "c16")
VICTIM = "r1"
NUM_NEW = 12


@pytest.fixture(scope="module")
def prompts(tiny_assets) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    return [tuple(tokenizer.encode(text)) for text in TEXTS]


def make_engine(assets) -> LLMEngine:
    config = EngineConfig(
        model_path=str(assets.models["llama"]), max_loras=4, block_size=4, num_kv_blocks=256, max_lora_rank=16
    )
    engine = LLMEngine.from_config(config)
    return add_tiny_adapters(engine, assets, "llama")


def add_requests(engine: LLMEngine, prompts: list[tuple[int, ...]], skip: str | None = None) -> None:
    for i, (prompt, adapter) in enumerate(zip(prompts, ADAPTERS, strict=False)):
        if f"r{i}" != skip:
            params = SamplingParams(max_new_tokens=NUM_NEW, ignore_eos=True, logprobs=True)
            engine.add_request(GenerationRequest(f"r{i}", prompt, params, adapter))


def run(engine: LLMEngine) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = {}
    for _ in range(500):
        if not engine.has_unfinished():
            return events
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    raise AssertionError("the engine never finished")


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


@pytest.fixture(scope="module")
def quiet(tiny_assets, prompts) -> dict[str, list[int]]:
    engine = make_engine(tiny_assets)
    add_requests(engine, prompts, skip=VICTIM)
    return {rid: tokens(events) for rid, events in run(engine).items()}


def seq_id_of(engine: LLMEngine, request_id: str) -> int:
    return engine._requests[request_id].seq.seq_id


def assert_isolated(events: dict[str, list[TokenEvent]], quiet: dict[str, list[int]], error: str) -> None:
    victim = events[VICTIM][-1]
    assert victim.finish_reason is FinishReason.ERROR and error in (victim.error or ""), victim
    for rid, expected in quiet.items():
        assert tokens(events[rid]) == expected, rid
        assert events[rid][-1].finish_reason is FinishReason.LENGTH


def after_steps(n: int):
    """True from the n-th call on (the victim fails mid-generation, not at once)."""
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] >= n

    return due


def test_non_finite_logits_fail_only_their_request(tiny_assets, prompts, quiet) -> None:
    engine = make_engine(tiny_assets)
    add_requests(engine, prompts)
    victim, execute, due = seq_id_of(engine, VICTIM), engine.runner.execute, after_steps(4)

    def poisoned(batch: Any) -> torch.Tensor:
        logits = execute(batch).clone()  # inference tensors are read-only
        rows = [i for i, c in enumerate(batch.chunks) if c.seq_id == victim]
        if rows and due():
            logits[rows[0], 7] = float("nan")
        return logits

    engine.runner.execute = poisoned  # type: ignore[method-assign]
    events = run(engine)
    assert_isolated(events, quiet, "non-finite logits")
    assert 0 < len(tokens(events[VICTIM])) < NUM_NEW  # it got tokens before it failed


def test_a_batch_that_fails_is_run_again_without_the_request_that_breaks_it(
    tiny_assets, prompts, quiet
) -> None:
    engine = make_engine(tiny_assets)
    add_requests(engine, prompts)
    victim, execute, due = seq_id_of(engine, VICTIM), engine.runner.execute, after_steps(3)

    def fragile(batch: Any) -> torch.Tensor:
        if any(c.seq_id == victim for c in batch.chunks) and due():
            raise RuntimeError("index out of range in the attention kernel")
        return execute(batch)

    engine.runner.execute = fragile  # type: ignore[method-assign]
    assert_isolated(run(engine), quiet, "model step failed: index out of range")
    assert engine.num_failed_steps_in_a_row == 0


def test_a_sampler_crash_is_retried_row_by_row(tiny_assets, prompts, quiet) -> None:
    engine = make_engine(tiny_assets)
    add_requests(engine, prompts)
    victim, sample, due = seq_id_of(engine, VICTIM), engine.sampler, after_steps(2)

    class Crashing:
        def __call__(self, logits: torch.Tensor, rows: list) -> list:
            if any(r.seq_id == victim for r in rows) and due():
                raise OverflowError("Overflow when unpacking long long")
            return sample(logits, rows)

        def free(self, seq_id: int) -> None:
            sample.free(seq_id)

    engine.sampler = Crashing()  # type: ignore[assignment]
    assert_isolated(run(engine), quiet, "sampling failed: Overflow")


def test_a_detokenizer_error_ends_only_that_request(tiny_assets, prompts, quiet) -> None:
    engine = make_engine(tiny_assets)
    add_requests(engine, prompts)
    output, due = engine._requests[VICTIM].output, after_steps(3)
    append = output.append

    def broken(token_id: int) -> str:
        if due():
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return append(token_id)

    output.append = broken  # type: ignore[method-assign]
    assert_isolated(run(engine), quiet, "decoding failed")


def test_a_step_in_which_nothing_runs_is_counted_as_failed(tiny_assets, prompts) -> None:
    engine = make_engine(tiny_assets)
    add_requests(engine, prompts[:2])

    def broken(batch: Any) -> torch.Tensor:
        raise RuntimeError("device lost")

    engine.runner.execute = broken  # type: ignore[method-assign]
    events = engine.step()
    assert {e.request_id for e in events} == {"r0", "r1"}
    assert all(e.finish_reason is FinishReason.ERROR and "device lost" in e.error for e in events)
    assert engine.num_failed_steps_in_a_row == 1 and not engine.has_unfinished()
    assert engine.block_manager.usage == 0.0
