"""`n > 1` choices: siblings wait for the first one's prefill and read its prompt from the prefix cache."""

from __future__ import annotations

from typing import Any

import pytest
from transformers import AutoTokenizer

from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.adapters.registry import AdapterEntry
from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.request import GenerationRequest, TokenEvent
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.sequence import AdapterRef

NUM_NEW = 6
TEXT = "The quick brown fox jumps over the lazy dog and keeps running far away from the farm"


def _engine(assets: Any, **overrides: Any) -> LLMEngine:
    settings: dict[str, Any] = {"max_loras": 2, "block_size": 4, "num_kv_blocks": 256, "max_lora_rank": 16}
    config = EngineConfig(model_path=str(assets.models["llama"]), **(settings | overrides))
    engine = LLMEngine.from_config(config)
    path = assets.adapters["llama"]["b8"]
    weights = load_peft_adapter(path, "b8", engine.runner.hf_config, config.max_lora_rank)
    engine.add_adapter(AdapterEntry(AdapterRef("b8", 0), weights, source=str(path)))
    return engine


def _run(engine: LLMEngine, requests: list[GenerationRequest]) -> tuple[dict[str, list[int]], int]:
    """Tokens per request and the number of token positions the model computed."""
    computed: list[int] = []
    engine.step_observers.append(lambda step: computed.append(step.num_tokens))
    for request in requests:
        engine.add_request(request)
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        event: TokenEvent
        for event in engine.step():
            if event.token_id is not None:
                tokens.setdefault(event.request_id, []).append(event.token_id)
    return tokens, sum(computed)


def _choices(prompt: tuple[int, ...], n: int, share: bool, adapter: str | None, **params: Any) -> list:
    params = {"max_new_tokens": NUM_NEW, "ignore_eos": True} | params
    return [
        GenerationRequest(
            f"c{i}",
            prompt,
            SamplingParams(**params),
            adapter,
            shares_prompt_with="c0" if share and i else None,
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("adapter", [None, "b8"])
def test_four_choices_compute_the_prompt_once(tiny_assets, adapter: str | None) -> None:
    prompt = tuple(AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir).encode(TEXT))
    engine = _engine(tiny_assets)
    block = engine.runner.block_size
    shared, shared_cost = _run(engine, _choices(prompt, 4, True, adapter))
    alone, alone_cost = _run(_engine(tiny_assets), _choices(prompt, 4, False, adapter))
    decodes = 4 * (NUM_NEW - 1)
    assert alone_cost == 4 * len(prompt) + decodes  # submitted together, nothing is shared
    # Each sibling recomputes at most the prompt's last, partial block (and its last token).
    assert shared_cost <= len(prompt) + 3 * block + decodes
    assert shared_cost < alone_cost
    assert shared == alone  # greedy: reading the cached prompt changes no token
    assert len({tuple(t) for t in shared.values()}) == 1
    assert engine.block_manager.usage == 0.0


def test_seeded_choices_differ_and_leader_may_finish_first(tiny_assets) -> None:
    prompt = tuple(AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir).encode(TEXT))
    engine = _engine(tiny_assets)
    requests = [
        GenerationRequest(
            f"c{i}",
            prompt,
            SamplingParams(
                max_new_tokens=1 if i == 0 else NUM_NEW, temperature=1.5, seed=10 + i, ignore_eos=True
            ),
            shares_prompt_with="c0" if i else None,
        )
        for i in range(3)
    ]
    tokens, _ = _run(engine, requests)
    assert len(tokens["c0"]) == 1 and len(tokens["c1"]) == len(tokens["c2"]) == NUM_NEW
    assert tokens["c1"] != tokens["c2"]  # their own seeds
    assert engine.block_manager.num_prefix_hit_tokens >= 2 * (len(prompt) // 4 - 1) * 4
