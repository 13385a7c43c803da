"""Deferred detokenisation: the fan-out thread's texts equal the engine's own, events keep their order."""

from __future__ import annotations

import threading

import pytest
import torch

from loraplex.server.engine import EngineConfig, LLMEngine
from loraplex.server.request import FinishReason, GenerationRequest, TokenEvent
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.text_fanout import FanOut, complete


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _events(assets, defer: bool) -> list[TokenEvent]:
    engine = LLMEngine.from_config(EngineConfig(model_path=str(assets.models["llama"]), block_size=4))
    engine.defer_text = defer
    prompts = [engine.tokenizer.encode(t) for t in ("def add(a, b):", "Hello there", "import torch")]
    stops = [(), ("e",), ()]  # the request with a stop string is detokenised on the engine thread
    for i, (prompt, stop) in enumerate(zip(prompts, stops, strict=True)):
        params = SamplingParams(max_new_tokens=10 + i, ignore_eos=True, stop=stop, temperature=0.0)
        engine.add_request(GenerationRequest(f"r{i}", tuple(prompt), params))
    events: list[TokenEvent] = []
    steps = 0
    while engine.has_unfinished():
        events += complete(engine.step(), engine.take_text_jobs())
        steps += 1
        if steps == 4:
            abort = engine.abort("r2")  # cancelled mid-way: no text of its own
            events += complete([abort], engine.take_text_jobs())
    assert not engine.take_text_jobs()
    return events


def test_deferred_texts_equal_the_inline_ones(tiny_assets) -> None:
    inline, deferred = _events(tiny_assets, defer=False), _events(tiny_assets, defer=True)
    assert deferred == inline
    texts = {rid: "".join(e.text for e in inline if e.request_id == rid) for rid in ("r0", "r1", "r2")}
    assert texts["r0"] and "e" not in texts["r1"]
    assert [e.finish_reason for e in inline if e.request_id == "r2"][-1] is FinishReason.CANCELLED


def test_fanout_delivers_in_submission_order_and_drains_on_close() -> None:
    got: list[str] = []
    threads: set[str] = set()

    def deliver(event: TokenEvent) -> None:
        got.append(event.text)
        threads.add(threading.current_thread().name)

    fanout = FanOut(deliver)
    for i in range(50):
        fanout.submit([TokenEvent("r", i, str(i))], [])
    fanout.close()
    assert got == [str(i) for i in range(50)]
    assert threads == {"loraplex-fanout"}
