"""LLMEngine end to end on the tiny checkpoints, against `transformers` + `peft` (float32, CPU)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from engine_support import add_tiny_adapters
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from loraplex.server.demo_training import build_trained_assets
from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.engine_api import InvalidRequestError, UnknownAdapterError
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sampling_params import SamplingParams

KINDS = ("llama", "gemma2")
ADAPTERS = (None, "a4", "b8", "c16")
NUM_NEW = 32
TEXTS = (
    "def add(a, b):",
    "The quick brown fox jumps over the lazy dog and keeps running",
    "Hello",
    "import torch\nclass Model:",
)


@dataclass
class Reference:
    """Greedy continuations by transformers (+ peft), computed once per session."""

    assets: Any
    _models: dict[tuple[str, str | None], Any] = field(default_factory=dict)
    _cache: dict[tuple, tuple[list[int], list[float]]] = field(default_factory=dict)

    def _model(self, kind: str, adapter: str | None) -> Any:
        if (kind, adapter) not in self._models:
            model = AutoModelForCausalLM.from_pretrained(self.assets.models[kind], dtype=torch.float32)
            model.generation_config.eos_token_id = None  # the engine side runs with ignore_eos
            if adapter is not None:
                model = PeftModel.from_pretrained(model, self.assets.adapters[kind][adapter])
            self._models[kind, adapter] = model.eval()
        return self._models[kind, adapter]

    def generate(
        self, kind: str, adapter: str | None, prompt: tuple[int, ...]
    ) -> tuple[list[int], list[float]]:
        """(tokens, logprob of each chosen token) for NUM_NEW greedy steps, EOS ignored."""
        key = (kind, adapter, prompt)
        if key not in self._cache:
            config = GenerationConfig(
                max_new_tokens=NUM_NEW,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
            )
            with torch.no_grad():
                out = self._model(kind, adapter).generate(
                    input_ids=torch.tensor([prompt]), generation_config=config
                )
            tokens = out.sequences[0, len(prompt) :].tolist()
            logprobs = [
                float(torch.log_softmax(s[0], -1)[t]) for s, t in zip(out.logits, tokens, strict=True)
            ]
            self._cache[key] = (tokens, logprobs)
        return self._cache[key]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The tiny models are latency bound: extra intra-op threads only contend on a busy CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def reference(tiny_assets) -> Reference:
    return Reference(tiny_assets)


@pytest.fixture(scope="session")
def prompts(tiny_assets) -> list[tuple[int, ...]]:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    return [tuple(tokenizer.encode(text)) for text in TEXTS]


def make_engine(assets, kind: str, **overrides: Any) -> LLMEngine:
    settings: dict[str, Any] = {"max_loras": 2, "block_size": 4, "num_kv_blocks": 256, "max_lora_rank": 16}
    config = EngineConfig(model_path=str(assets.models[kind]), **(settings | overrides))
    engine = LLMEngine.from_config(config)
    return add_tiny_adapters(engine, assets, kind)


def request(rid: str, prompt: tuple[int, ...], adapter: str | None, **params: Any) -> GenerationRequest:
    params = {"max_new_tokens": NUM_NEW, "ignore_eos": True, "logprobs": True} | params
    return GenerationRequest(rid, prompt, SamplingParams(**params), adapter)


def run(engine: LLMEngine, on_step=None) -> dict[str, list[TokenEvent]]:
    events: dict[str, list[TokenEvent]] = {}
    steps = 0
    while engine.has_unfinished():
        for event in engine.step():
            events.setdefault(event.request_id, []).append(event)
        steps += 1
        if on_step is not None:
            on_step(steps)
        assert steps < 2000
    return events


def tokens(events: list[TokenEvent]) -> list[int]:
    return [e.token_id for e in events if e.token_id is not None]


@pytest.mark.parametrize("kind", [*KINDS, "trained"])
def test_mixed_batch_matches_peft_per_adapter(kind, tiny_assets, reference, prompts) -> None:
    """`trained`: the demo's trained Llama and its four fine-tunes (trained weights have
    structure random ones lack), prompts from its own tokenizer."""
    if kind == "trained":
        tiny_assets = build_trained_assets().as_tiny_assets(kind)  # the session's, cached on disk
        reference = Reference(tiny_assets)
        tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
        prompts = [tuple(tokenizer.encode(text)) for text in TEXTS]
    adapters = (None, *tiny_assets.adapters[kind])
    engine = make_engine(tiny_assets, kind)
    batch: list[tuple[str, tuple[int, ...], str | None]] = []
    for i, adapter in enumerate(adapters * 2):
        batch.append((f"r{i}", prompts[i % len(prompts)], adapter))
    for rid, prompt, adapter in batch:
        engine.add_request(request(rid, prompt, adapter))
    slots_per_step: list[int] = []
    execute = engine.runner.execute

    def watch(batch):  # what the model runner is actually given
        slots_per_step.append(len(batch.lora_slots))
        return execute(batch)

    engine.runner.execute = watch  # type: ignore[method-assign]
    events = run(engine)
    outputs = {rid: reference.generate(kind, adapter, prompt) for rid, prompt, adapter in batch}
    for rid, (ref_tokens, ref_logprobs) in outputs.items():
        assert tokens(events[rid]) == ref_tokens, rid
        got = [e.logprob for e in events[rid]]
        assert got == pytest.approx(ref_logprobs, abs=1e-4)
        assert events[rid][-1].finish_reason is FinishReason.LENGTH
    assert len({tuple(t) for t, _ in outputs.values()}) >= 4  # the adapters really differ
    assert max(slots_per_step) == 2  # three or four adapters took turns in two slots
    assert engine.block_manager.usage == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_steady_decode_steps_match_peft_per_adapter(kind, tiny_assets, reference, prompts) -> None:
    """Without logprobs a running batch takes the columnar steady step (`server/steady_decode.py`)
    from its second decode step on: its greedy tokens are transformers + peft's as well, every
    adapter and the base mixed in one batch."""
    adapters = (None, *tiny_assets.adapters[kind])
    engine = make_engine(tiny_assets, kind, max_loras=len(adapters))
    batch = [(f"s{i}", prompts[i % len(prompts)], adapter) for i, adapter in enumerate(adapters * 2)]
    for rid, prompt, adapter in batch:
        engine.add_request(request(rid, prompt, adapter, logprobs=False))
    steady_steps = 0
    steady_step = engine._steady_step

    def counted():
        nonlocal steady_steps
        outputs = steady_step()
        steady_steps += outputs is not None
        return outputs

    engine._steady_step = counted  # type: ignore[method-assign]
    events = run(engine)
    for rid, prompt, adapter in batch:
        assert tokens(events[rid]) == reference.generate(kind, adapter, prompt)[0], rid
        assert events[rid][-1].finish_reason is FinishReason.LENGTH
    assert steady_steps >= NUM_NEW - 3  # the prefill step and the first decode step are general
    assert engine.block_manager.usage == 0.0


@pytest.mark.parametrize("kind", KINDS)
def test_requests_joining_mid_decode_match_running_alone(kind, tiny_assets, reference, prompts) -> None:
    engine = make_engine(tiny_assets, kind, max_batch_tokens=8)
    engine.add_request(request("first", prompts[1], "b8"))
    late = {
        3: ("late-base", prompts[0], None),
        7: ("late-c16", prompts[3], "c16"),
        12: ("late-a4", prompts[1], "a4"),
    }

    def on_step(step: int) -> None:
        if step in late:
            rid, prompt, adapter = late[step]
            engine.add_request(request(rid, prompt, adapter))

    events = run(engine, on_step)
    assert tokens(events["first"]) == reference.generate(kind, "b8", prompts[1])[0]
    for rid, prompt, adapter in late.values():
        assert tokens(events[rid]) == reference.generate(kind, adapter, prompt)[0], rid


@pytest.mark.parametrize("kind", KINDS)
def test_prefix_cache_is_per_adapter_and_reused(kind, tiny_assets, reference, prompts) -> None:
    engine = make_engine(tiny_assets, kind)
    prompt = prompts[1]
    engine.add_request(request("a", prompt, "a4"))
    first = run(engine)["a"]
    engine.add_request(request("b", prompt, "b8"))  # a4's blocks are cached now: b8 must not use them
    second = run(engine)["b"]
    assert tokens(first) == reference.generate(kind, "a4", prompt)[0]
    assert tokens(second) == reference.generate(kind, "b8", prompt)[0]
    assert engine.block_manager.num_prefix_hit_tokens == 0
    engine.add_request(request("again", prompt, "a4"))
    again = run(engine)["again"]
    assert engine.block_manager.num_prefix_hit_tokens >= len(prompt) - engine.runner.block_size
    assert tokens(again) == reference.generate(kind, "a4", prompt)[0]


@pytest.mark.parametrize(("kind", "prefix_caching"), [("llama", False), ("gemma2", False), ("llama", True)])
def test_preemption_under_tiny_kv_budget_keeps_tokens_correct(
    kind, prefix_caching, tiny_assets, reference, prompts
) -> None:
    """Recompute after preemption, from scratch or from the blocks the prefix cache kept."""
    engine = make_engine(tiny_assets, kind, num_kv_blocks=24, enable_prefix_caching=prefix_caching)
    batch = [(f"r{i}", prompts[i % len(prompts)], ADAPTERS[i % 4]) for i in range(5)]
    for rid, prompt, adapter in batch:
        engine.add_request(request(rid, prompt, adapter))
    events = run(engine)
    assert engine.scheduler.num_preemptions > 0
    assert (
        engine.block_manager.num_prefix_hit_tokens > 0
    ) is prefix_caching  # cache on: cached blocks were reused
    for rid, prompt, adapter in batch:
        assert tokens(events[rid]) == reference.generate(kind, adapter, prompt)[0], rid


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(tiny_assets, reference, prompts) -> None:
    engine = make_engine(tiny_assets, "llama")
    sampled = {"temperature": 1.5, "seed": 1234}
    engine.add_request(request("s1", prompts[0], "b8", **sampled))
    engine.add_request(request("k1", prompts[1], "a4", temperature=2.0, top_k=1))
    first = run(engine)
    engine.add_request(request("other", prompts[2], None, temperature=1.0))
    engine.add_request(request("s2", prompts[0], "b8", **sampled))
    second = run(engine)
    assert tokens(first["s1"]) == tokens(second["s2"])
    assert tokens(first["s1"]) != reference.generate("llama", "b8", prompts[0])[0]
    assert tokens(first["k1"]) == reference.generate("llama", "a4", prompts[1])[0]


def test_stop_token_eos_and_text(tiny_assets, reference, prompts) -> None:
    engine = make_engine(tiny_assets, "llama")
    ref_tokens = reference.generate("llama", None, prompts[0])[0]
    stop_at = next(i for i, t in enumerate(ref_tokens) if i > 2 and t not in ref_tokens[:i])
    engine.add_request(request("stop", prompts[0], None, stop_token_ids=(ref_tokens[stop_at],)))
    engine.add_request(request("eos", prompts[0], None, ignore_eos=False, max_new_tokens=4))
    engine.eos_token_ids = frozenset({ref_tokens[1]})
    events = run(engine)
    assert tokens(events["stop"]) == ref_tokens[: stop_at + 1]
    assert events["stop"][-1].finish_reason is FinishReason.STOP
    assert tokens(events["eos"]) == ref_tokens[:2] and events["eos"][-1].finish_reason is FinishReason.EOS
    text = "".join(e.text for e in events["stop"])
    assert text == engine.tokenizer.decode(ref_tokens[:stop_at], skip_special_tokens=True)


def test_abort_frees_blocks_and_slot(tiny_assets, prompts) -> None:
    engine = make_engine(tiny_assets, "llama")
    engine.add_request(request("x", prompts[1], "c16"))
    engine.step()
    assert engine.block_manager.usage > 0
    final = engine.abort("x")
    assert final is not None and final.finish_reason is FinishReason.CANCELLED
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert engine.registry.slot_users() == {engine.registry.get("c16").ref: 0}
    assert not engine.has_unfinished() and engine.abort("x") is None


def test_request_that_can_never_fit_the_kv_cache_is_refused(tiny_assets, prompts) -> None:
    engine = make_engine(tiny_assets, "llama", num_kv_blocks=4)
    with pytest.raises(InvalidRequestError, match="KV cache"):
        engine.add_request(request("big", prompts[0], None))
    with pytest.raises(UnknownAdapterError):
        engine.add_request(request("ghost", prompts[0], "ghost", max_new_tokens=2))
    assert not engine.has_unfinished()


def test_stop_string_ends_the_text_before_it(tiny_assets, reference, prompts) -> None:
    engine = make_engine(tiny_assets, "llama")
    ref_tokens = reference.generate("llama", "b8", prompts[2])[0]
    full = engine.tokenizer.decode(ref_tokens, skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    engine.add_request(request("s", prompts[2], "b8", stop=(stop,)))
    events = run(engine)["s"]
    assert events[-1].finish_reason is FinishReason.STOP
    assert "".join(e.text for e in events) == full[: full.index(stop)]
    assert tokens(events) == ref_tokens[: len(events)]


def test_a_decode_step_reuses_what_each_request_made_once(tiny_assets, prompts) -> None:
    """Bookkeeping per step is O(the step's sequences): every request hands the sampler the one
    `SamplingRow` it made on arrival (its output a live list the engine appends to), and decode
    steps of an unchanged batch skip the runner's per-step input arrays."""
    engine = make_engine(tiny_assets, "llama", max_loras=4)
    for i, (prompt, adapter) in enumerate(zip(prompts, ADAPTERS, strict=False)):
        penalty = {"repetition_penalty": 1.3, "frequency_penalty": 0.2} if i == 1 else {}
        engine.add_request(request(f"r{i}", prompt, adapter, **penalty))
    rows: dict[int, Any] = {}
    sample = engine.sampler

    class Recording:
        def __call__(self, logits: torch.Tensor, batch: list) -> list:
            for row in batch:
                assert rows.setdefault(row.seq_id, row) is row
            return sample(logits, batch)

        def free(self, seq_id: int) -> None:
            sample.free(seq_id)

    engine.sampler = Recording()  # type: ignore[assignment]
    full_builds, host_arrays = [], engine.runner.buffers._host_arrays
    engine.runner.buffers._host_arrays = lambda *a: full_builds.append(1) or host_arrays(*a)  # type: ignore[method-assign]
    events = run(engine)
    assert sorted(tuple(r.output_token_ids) for r in rows.values()) == sorted(
        tuple(tokens(e)) for e in events.values()
    )
    assert len(full_builds) < engine.num_steps / 2  # most steps are steady decodes of the same batch
