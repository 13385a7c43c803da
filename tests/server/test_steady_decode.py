"""The columnar steady decode step against the general per-sequence step.

Each test runs the same requests on two engines, one with the steady path switched off (every
step goes through `Scheduler.schedule`, `SequenceChunk`s and per-request events, the path the
fidelity tests hold against transformers + PEFT), and compares tokens and events. The requests
join and leave mid-batch, end by length, stop token, EOS and stop string, mix adapters and
sampling settings, and one of them fails.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from engine_support import add_tiny_adapters
from transformers import AutoTokenizer

from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.model_runner import ModelRunner
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.sequence import GeneratedTokens, Sequence
from loraplex.server.text_fanout import TokenBatch, complete

TEXTS = (
    "def add(a, b):",
    "The quick brown fox jumps",
    "Hello",
    "import torch\nclass Model:",
    "x = 1",
    "for i",
)
ADAPTERS = (None, "a4", "b8", "c16", "a4", None)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def make_engine(assets, steady: bool, **overrides: Any) -> LLMEngine:
    static = overrides.pop("static_decode", None)
    fields = {"model_path": str(assets.models["llama"]), "max_loras": 4, "block_size": 4, "num_kv_blocks": 256,
              "max_lora_rank": 16, "max_num_seqs": 8, "max_batch_tokens": 64} | overrides  # fmt: skip
    config = EngineConfig(**fields)
    runner = ModelRunner(dataclasses.replace(config.runner_config(), static_decode=static))
    engine = LLMEngine(config, runner, AutoTokenizer.from_pretrained(str(runner.model_path)))
    add_tiny_adapters(engine, assets, "llama")
    if not steady:
        engine._steady_step = lambda: None  # type: ignore[method-assign]
    return engine


def requests(engine: LLMEngine, extra: dict[int, dict] | None = None) -> list[GenerationRequest]:
    out = []
    for i, (text, adapter) in enumerate(zip(TEXTS, ADAPTERS, strict=True)):
        params = {"max_new_tokens": 6 + 3 * i, "ignore_eos": True} | (extra or {}).get(i, {})
        out.append(
            GenerationRequest(
                f"r{i}", tuple(engine.tokenizer.encode(text)), SamplingParams(**params), adapter
            )
        )
    return out


def run(engine: LLMEngine, pending: list[GenerationRequest], defer: bool) -> tuple[list[TokenEvent], int]:
    """Every event in order (texts made as the fan-out thread makes them) and the number of
    steady steps; requests 0-2 come first, 3-4 join at step 3, 5 at step 9."""
    engine.defer_text = defer
    joins = {0: pending[:3], 3: pending[3:5], 9: pending[5:]}
    events: list[TokenEvent] = []
    steady = 0
    for step in range(400):
        for request in joins.get(step, []):
            engine.add_request(request)
        if not engine.has_unfinished() and step > 9:
            return events, steady
        outputs = engine.step_outputs()
        steady += any(isinstance(o, TokenBatch) for o in outputs) or (
            engine._steady is not None and bool(outputs)
        )
        events += complete(outputs, engine.take_text_jobs())
    raise AssertionError("the engine never finished")


def by_request(events: list[TokenEvent]) -> dict[str, list[TokenEvent]]:
    out: dict[str, list[TokenEvent]] = {}
    for event in events:
        out.setdefault(event.request_id, []).append(event)
    return out


@pytest.mark.parametrize("defer", [True, False], ids=["deferred-text", "inline-text"])
def test_steady_steps_give_the_general_path_s_tokens_and_events(tiny_assets, defer: bool) -> None:
    general, steady = make_engine(tiny_assets, False), make_engine(tiny_assets, True)
    extra = {
        1: {"stop": ("e",)},  # a stop string: its row takes the per-row path every step
        2: {"temperature": 0.8, "top_k": 20, "seed": 7},  # sampled with its own generator
        4: {"repetition_penalty": 1.3, "frequency_penalty": 0.5},  # penalties read the live generated view
    }
    want, _ = run(general, requests(general, extra), defer)
    got, num_steady = run(steady, requests(steady, extra), defer)
    assert num_steady >= 10  # most decode steps took the steady path
    assert by_request(got) == by_request(want)
    finals = {rid: evs[-1] for rid, evs in by_request(got).items()}
    assert {e.finish_reason for e in finals.values()} <= {FinishReason.LENGTH, FinishReason.STOP}
    assert all(e.num_generated_tokens == len([x for x in evs if x.token_id is not None])
               for e, evs in zip(finals.values(), by_request(got).values(), strict=True))  # fmt: skip
    assert "".join(e.text for e in by_request(got)["r0"])  # texts were made
    assert not steady.has_unfinished() and steady.block_manager.usage == 0.0


def test_stop_tokens_and_eos_end_rows_mid_batch(tiny_assets) -> None:
    probe = make_engine(tiny_assets, False)
    free_run, _ = run(probe, requests(probe), defer=True)
    tokens = {
        rid: [e.token_id for e in evs if e.token_id is not None] for rid, evs in by_request(free_run).items()
    }
    extra = {0: {"stop_token_ids": (tokens["r0"][3],)}, 3: {"ignore_eos": False}}
    results = []
    for steady in (False, True):
        engine = make_engine(tiny_assets, steady)
        engine.eos_token_ids = frozenset({tokens["r3"][4]})
        results.append(by_request(run(engine, requests(engine, extra), defer=True)[0]))
    want, got = results
    assert got == want
    assert (
        got["r0"][-1].finish_reason is FinishReason.STOP
        and len(got["r0"]) == tokens["r0"].index(tokens["r0"][3]) + 1
    )
    assert got["r3"][-1].finish_reason is FinishReason.EOS


def test_prefix_cache_commits_of_steady_steps_serve_a_later_request(tiny_assets) -> None:
    """Blocks filled by steady steps are hashed as the general path hashes them: a request whose
    prompt is an earlier request's prompt + output reads the same prefix hits."""
    hits = []
    for steady in (False, True):
        engine = make_engine(tiny_assets, steady, enable_prefix_caching=True)
        first = requests(engine)[:3]
        events, _ = run(engine, first, defer=True)
        r0 = [e.token_id for e in by_request(events)["r0"] if e.token_id is not None]
        follow = GenerationRequest(
            "follow", first[0].prompt_token_ids + tuple(r0), SamplingParams(max_new_tokens=3)
        )
        engine.add_request(follow)
        while engine.has_unfinished():
            engine.step()
        hits.append(engine.block_manager.num_prefix_hit_tokens)
    assert hits[0] == hits[1] > len(requests(make_engine(tiny_assets, False))[0].prompt_token_ids) // 4 * 4


def test_static_buffer_steady_steps_equal_eager_ones(tiny_assets) -> None:
    """The graph-bucket path (padded static buffers, run eagerly on the CPU) under steady steps."""
    eager = make_engine(tiny_assets, True)
    static = make_engine(tiny_assets, True, static_decode=True)
    replays: list[int] = []
    replay = static.runner.graphs.replay
    static.runner.graphs.replay = lambda inputs, bucket, n: (
        replays.append(bucket) or replay(inputs, bucket, n)
    )  # type: ignore[method-assign]
    want, _ = run(eager, requests(eager), defer=True)
    got, _ = run(static, requests(static), defer=True)
    assert by_request(got) == by_request(want)
    assert len(replays) >= 10 and set(replays) <= {1, 2, 4, 8}


def test_steady_steps_hand_out_one_set_of_step_inputs(tiny_assets) -> None:
    """While the batch stays the same, each step's inputs are the last step's objects moved on in
    place (after the first, built from its chunks): the same `StepInputs` and attention group, the
    group's longest context one more, its block tables as wide as that context needs."""
    engine = make_engine(tiny_assets, True)
    seen: list[tuple[object, object, int, int]] = []
    build_decode = engine.runner.buffers.build_decode

    def recording(*args, **kwargs):
        inputs = build_decode(*args, **kwargs)
        group = inputs.meta.attention_groups[0]
        seen.append((inputs, group, group.max_context_len, group.block_tables.shape[1]))
        return inputs

    engine.runner.buffers.build_decode = recording  # type: ignore[method-assign]
    for request in requests(engine, {i: {"max_new_tokens": 20} for i in range(3)})[:3]:
        engine.add_request(request)
    while len(seen) < 12:
        engine.step()
    _, _, first_len, _ = seen[0]
    assert [n for *_, n, _ in seen] == list(range(first_len, first_len + len(seen)))
    inputs, group, *_ = seen[1]
    assert all(s[0] is inputs and s[1] is group for s in seen[1:])
    assert [width for *_, width in seen] == [-(-n // 4) for *_, n, _ in seen]  # block_size 4


def poisoned_run(assets, steady: bool, victim: str, how: str) -> dict[str, list[TokenEvent]]:
    engine = make_engine(assets, steady)
    pending = requests(engine)
    engine.defer_text = True
    for request in pending[:4]:
        engine.add_request(request)
    seq_id = engine._requests[victim].seq.seq_id
    calls = {"n": 0}

    def due() -> bool:
        calls["n"] += 1
        return calls["n"] == 5

    runner, sampler = engine.runner, engine.sampler
    if how == "nan":
        for name in ("execute", "execute_decode"):
            inner = getattr(runner, name)

            def poisoned(batch, inner=inner, name=name):
                logits = inner(batch).clone()
                ids = (
                    [c.seq_id for c in batch.chunks]
                    if name == "execute"
                    else [s.seq.seq_id for s in batch.layout.states]
                )
                if seq_id in ids and due():
                    logits[ids.index(seq_id), 3] = float("nan")
                return logits

            setattr(runner, name, poisoned)
    elif how == "raise":
        inner_decode = runner.execute_decode

        def fragile(step):
            if due():
                raise RuntimeError("index out of range in the attention kernel")
            return inner_decode(step)

        runner.execute_decode = fragile  # type: ignore[method-assign]
    elif how == "sampler":
        inner_ids = sampler.sample_ids

        def crashing(logits, rows):
            if due():
                raise OverflowError("Overflow when unpacking long long")
            return inner_ids(logits, rows)

        sampler.sample_ids = crashing  # type: ignore[method-assign]
    events: list[TokenEvent] = []
    while engine.has_unfinished():
        events += complete(engine.step_outputs(), engine.take_text_jobs())
    return by_request(events)


@pytest.mark.parametrize("how", ["nan", "raise", "sampler"])
def test_a_failing_row_or_step_fails_only_what_it_should(tiny_assets, how: str) -> None:
    quiet = poisoned_run(tiny_assets, False, "r1", "none")
    got = poisoned_run(tiny_assets, True, "r1", how)
    if how == "nan":  # the victim ends with an error, everybody else as in the quiet run
        assert got["r1"][-1].finish_reason is FinishReason.ERROR and "non-finite" in got["r1"][-1].error
        assert 0 < len(got["r1"]) < len(quiet["r1"])
        assert {rid: evs for rid, evs in got.items() if rid != "r1"} == {
            rid: evs for rid, evs in quiet.items() if rid != "r1"
        }
    else:  # a failed steady step is redone by the general path; a crashed sampler row by row
        assert got == quiet


def test_token_batch_expands_to_events_with_special_rows_in_place() -> None:
    class Output:
        def __init__(self) -> None:
            self.seen: list[int] = []

        def append(self, token: int) -> str:
            self.seen.append(token)
            return f"<{token}>"

    outputs = (Output(), Output(), Output())
    special = TokenEvent(
        "b", 8, "x", finish_reason=FinishReason.LENGTH, num_prompt_tokens=2, num_generated_tokens=9
    )
    batch = TokenBatch(("a", "b", "c"), [7, 8, 9], (3, 2, 5), (1, 4, 2), 3, outputs, {1: special})  # type: ignore[arg-type]
    assert batch.num_rows == 3
    assert batch.events() == [
        TokenEvent("a", 7, "<7>", num_prompt_tokens=3, num_generated_tokens=4),
        special,
        TokenEvent("c", 9, "<9>", num_prompt_tokens=5, num_generated_tokens=5),
    ]
    assert outputs[1].seen == [] and outputs[0].seen == [7]
    assert [e.text for e in batch.events(text=False)] == ["", "x", ""]


def test_generated_tokens_is_a_live_view_of_what_follows_the_prompt() -> None:
    seq = Sequence("r", (5, 6, 7), SamplingParams())
    view = GeneratedTokens(seq)
    assert len(view) == 0 and list(view) == [] and view[0:] == []
    seq.append_token(1)
    seq.append_token(2)
    seq.append_token(3)
    assert (
        len(view) == 3 and view[1:] == [2, 3] and view[-1] == 3 and view[0] == 1 and list(view) == [1, 2, 3]
    )
    with pytest.raises(IndexError):
        view[3]


def test_running_out_of_blocks_preempts_as_the_general_path_does(tiny_assets) -> None:
    """With too few KV blocks for every request to finish together, a steady step that cannot grow
    a row's table hands over to `Scheduler.schedule`, which preempts; tokens stay the same."""
    results, preemptions = [], []
    for steady in (False, True):
        engine = make_engine(tiny_assets, steady, num_kv_blocks=24, enable_prefix_caching=False)
        longer = {i: {"max_new_tokens": 30} for i in range(len(TEXTS))}  # ~10 blocks each
        results.append(by_request(run(engine, requests(engine, longer), defer=True)[0]))
        preemptions.append(engine.scheduler.num_preemptions)
    assert results[1] == results[0]
    assert preemptions[1] == preemptions[0] > 0
