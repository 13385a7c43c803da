"""Prompt log-probabilities (vLLM `prompt_logprobs`, TGI `decoder_input_details`) against transformers + peft.

A mixed-adapter batch, chunked prefill and preemption-free runs on the tiny checkpoints, float32 CPU:
each prompt position's logprob, rank and top alternatives equal what `log_softmax` of the
reference model's logits says over the same prompt.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from engine_support import add_tiny_adapters
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.forward_batch import SequenceChunk
from loraplex.server.model_runner import _chunk_starts
from loraplex.server.prompt_logprobs import PromptLogprobs
from loraplex.server.request import GenerationRequest, PromptTokenLogprob, TokenEvent
from loraplex.server.sampling_params import SamplingParams

TEXTS = (
    "The quick brown fox jumps over the lazy dog and keeps running",
    "def add(a, b):\n    return a + b",
    "Hello",
)
NUM_TOP = 3


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Reference:
    """log_softmax of transformers (+ peft) logits over a whole prompt, float32."""

    def __init__(self, assets: Any, kind: str) -> None:
        self.assets, self.kind = assets, kind
        self._models: dict[str | None, Any] = {}

    def logprobs(self, adapter: str | None, prompt: tuple[int, ...]) -> torch.Tensor:
        if adapter not in self._models:
            model = AutoModelForCausalLM.from_pretrained(self.assets.models[self.kind], dtype=torch.float32)
            if adapter is not None:
                model = PeftModel.from_pretrained(model, self.assets.adapters[self.kind][adapter])
            self._models[adapter] = model.eval()
        with torch.no_grad():
            logits = self._models[adapter](input_ids=torch.tensor([prompt])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)  # row p-1 scores prompt token p


def make_engine(assets: Any, kind: str, **overrides: Any) -> LLMEngine:
    settings: dict[str, Any] = {"max_loras": 2, "block_size": 4, "num_kv_blocks": 256, "max_lora_rank": 16}
    config = EngineConfig(model_path=str(assets.models[kind]), **(settings | overrides))
    engine = LLMEngine.from_config(config)
    return add_tiny_adapters(engine, assets, kind)


def request(
    rid: str, prompt: tuple[int, ...], adapter: str | None, prompt_logprobs: int | None
) -> GenerationRequest:
    params = SamplingParams(max_new_tokens=2, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    return GenerationRequest(rid, prompt, params, adapter)


def run(engine: LLMEngine) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            return events
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
    raise AssertionError("the engine did not finish")


def prompt_entries(events: list[TokenEvent]) -> tuple[PromptTokenLogprob | None, ...]:
    [entries] = [e.prompt_logprobs for e in events if e.prompt_logprobs is not None]
    return entries


def assert_matches(entries, expected: torch.Tensor, prompt: tuple[int, ...], num_top: int) -> None:
    assert len(entries) == len(prompt) and entries[0] is None
    for p in range(1, len(prompt)):
        entry, row = entries[p], expected[p - 1]
        assert entry.token_id == prompt[p]
        assert entry.logprob == pytest.approx(float(row[prompt[p]]), abs=1e-4), p
        assert entry.rank == int((row >= row[prompt[p]]).sum())  # vLLM's rank: 1 = the most likely
        values, ids = row.topk(num_top)
        assert [a.logprob for a in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
        assert [a.token_id for a in entry.top] == ids.tolist()


@pytest.fixture(scope="module")
def prompts(tiny_assets) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    return [tuple(tokenizer.encode(text)) for text in TEXTS]


@pytest.mark.parametrize("kind", ["llama", "gemma2"])
def test_mixed_adapter_batch_matches_peft(kind: str, tiny_assets, prompts) -> None:
    """Base and adapter rows in one batch, prompts cut into chunks (8 tokens a step), two slots for three adapters."""
    reference = Reference(tiny_assets, kind)
    engine = make_engine(tiny_assets, kind, max_batch_tokens=8)
    asked = [("base", None, 0), ("a4", "a4", NUM_TOP), ("b8", "b8", 1), ("c16", "c16", NUM_TOP)]
    for i, (rid, adapter, _) in enumerate(asked):
        engine.add_request(request(rid, prompts[i % 2], adapter, asked[i][2]))
    engine.add_request(request("plain", prompts[0], "a4", None))
    scored_steps: list[int] = []
    execute_scoring = engine.runner.execute_scoring

    def watch(batch, scoring):
        scored_steps.append(len(batch.lora_slots))
        return execute_scoring(batch, scoring)

    engine.runner.execute_scoring = watch  # type: ignore[method-assign]
    events = run(engine)
    for i, (rid, adapter, num_top) in enumerate(asked):
        prompt = prompts[i % 2]
        assert_matches(prompt_entries(events[rid]), reference.logprobs(adapter, prompt), prompt, num_top)
        assert [e.prompt_logprobs is not None for e in events[rid]] == [
            True,
            False,
        ]  # on the first event only
    assert all(e.prompt_logprobs is None for e in events["plain"])
    base, b8 = (reference.logprobs(a, prompts[0]) for a in (None, "b8"))
    assert (base - b8).abs().max() > 1e-2  # the adapter rows really differ from the base's
    assert len(scored_steps) >= 3 and max(scored_steps) == 2  # chunked, adapters mixed in the scored steps


def test_requests_without_prompt_logprobs_never_score(tiny_assets, prompts) -> None:
    engine = make_engine(tiny_assets, "llama")
    calls: list[int] = []
    engine.runner.execute_scoring = lambda *a: calls.append(1)  # type: ignore[method-assign]
    for i, prompt in enumerate(prompts):
        engine.add_request(request(f"r{i}", prompt, (None, "a4", "b8")[i], None))
    events = run(engine)
    assert not calls and all(e.prompt_logprobs is None for ev in events.values() for e in ev)


def test_prefix_cache_is_bypassed_while_scoring(tiny_assets, prompts) -> None:
    """Cached blocks have K/V but no logits: a scoring request recomputes the prompt, and still
    leaves its blocks for later requests."""
    reference = Reference(tiny_assets, "llama")
    engine = make_engine(tiny_assets, "llama")
    prompt = prompts[0]
    engine.add_request(request("warm", prompt, "a4", None))
    run(engine)
    blocks = engine.block_manager
    hits, queries = blocks.num_prefix_hit_tokens, blocks.num_prefix_query_tokens
    engine.add_request(request("scored", prompt, "a4", 2))
    entries = prompt_entries(run(engine)["scored"])
    assert (blocks.num_prefix_hit_tokens, blocks.num_prefix_query_tokens) == (hits, queries)  # no lookup
    assert_matches(entries, reference.logprobs("a4", prompt), prompt, 2)
    engine.add_request(request("again", prompt, "a4", None))
    run(engine)
    assert blocks.num_prefix_hit_tokens >= hits + len(prompt) - blocks.block_size


def test_one_token_prompt_has_only_the_null_entry(tiny_assets, prompts) -> None:
    engine = make_engine(tiny_assets, "llama")
    engine.add_request(request("one", prompts[2][:1], None, 2))
    assert prompt_entries(run(engine)["one"]) == (None,)


def test_collector_hands_out_once_after_every_position_and_recompute_overwrites() -> None:
    collector = PromptLogprobs(num_top=1, num_prompt_tokens=5)
    ids = [10, 11, 12, 13, 14, 99]  # one generated token after the prompt
    first = collector.scoring(0, ids, start=0, num_new=3)
    assert first is not None and first.target_ids == (11, 12, 13)
    collector.record(0, [PromptTokenLogprob(t, -1.0, 1) for t in first.target_ids])
    assert collector.take() is None  # position 4 is missing
    last = collector.scoring(2, ids, start=3, num_new=2)
    assert last is not None and last.target_ids == (14,) and last.chunk_index == 2
    collector.record(0, [PromptTokenLogprob(t, -2.0, 3) for t in first.target_ids])  # a recompute
    collector.record(3, [PromptTokenLogprob(14, -0.5, 1)])
    entries = collector.take()
    assert entries is not None and entries[0] is None
    assert [e.logprob for e in entries[1:]] == [-2.0, -2.0, -2.0, -0.5]
    assert collector.take() is None and collector.scoring(0, ids, start=5, num_new=1) is None


def test_preempted_mid_prefill_recomputes_the_same_scores(tiny_assets, prompts) -> None:
    """A tight KV cache preempts sequences before their prompt is scored; the recompute overwrites."""
    reference = Reference(tiny_assets, "llama")
    engine = make_engine(tiny_assets, "llama", max_batch_tokens=6, num_kv_blocks=20)
    preempted_while_scoring: list[bool] = []
    preempt = engine.scheduler._preempt

    def watch(seq, step):
        preempted_while_scoring.append(not seq.reads_prefix_cache)
        preempt(seq, step)

    engine.scheduler._preempt = watch  # type: ignore[method-assign]
    batch = [(f"r{i}", prompts[i % 2], (None, "a4", "b8")[i % 3]) for i in range(5)]
    for rid, prompt, adapter in batch:
        engine.add_request(
            GenerationRequest(
                rid, prompt, SamplingParams(max_new_tokens=8, ignore_eos=True, prompt_logprobs=1), adapter
            )
        )
    events = run(engine)
    assert any(preempted_while_scoring)
    for rid, prompt, adapter in batch:
        assert_matches(prompt_entries(events[rid]), reference.logprobs(adapter, prompt), prompt, 1)


def test_scoring_leaves_the_generated_tokens_unchanged(tiny_assets, prompts) -> None:
    engine = make_engine(tiny_assets, "gemma2", max_batch_tokens=8, enable_prefix_caching=False)
    for rid, k in (("plain", None), ("scored", 2)):
        params = SamplingParams(
            max_new_tokens=6, ignore_eos=True, logprobs=True, top_n_tokens=2, prompt_logprobs=k
        )
        engine.add_request(GenerationRequest(rid, prompts[1], params, "c16"))
    events = run(engine)
    plain, scored = (
        [(e.token_id, e.logprob, e.top_logprobs) for e in events[r]] for r in ("plain", "scored")
    )
    assert [t for t, _, _ in plain] == [t for t, _, _ in scored]
    assert [lp for _, lp, _ in plain] == pytest.approx([lp for _, lp, _ in scored], abs=1e-5)


def test_chunk_starts_follow_the_run_order() -> None:
    """One-token chunks (decodes, or a prefill's last token) run first: a chunk's rows start where it runs."""
    chunks = (
        SequenceChunk(0, (1, 2, 3), 0, (0,), None),
        SequenceChunk(1, (4,), 5, (1,), None),
        SequenceChunk(2, (5, 6), 0, (2,), None),
    )
    assert _chunk_starts(chunks, (1, 0, 2)) == [1, 0, 4]
