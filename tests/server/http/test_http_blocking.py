"""Tokenising in the worker pool only helps if the tokenizer releases the GIL meanwhile.

HF `tokenizers` releases it in `encode_batch`, not in `Tokenizer.encode`; transformers' fast
tokenizer call goes through `encode_batch`. A thread that counts while a long prompt is encoded
shows which: with the GIL held the whole call, it cannot count at all.
"""

from __future__ import annotations

import threading
import time

import pytest
from transformers import AutoTokenizer

from loraplex.server.demo_assets import TinyAssets
from loraplex.server.engine_api import InvalidRequestError
from loraplex.server.routes.generation import encode

LONG_PROMPT = "the model serves a team of adapters " * 3000


GAP_S = 0.04  # well over a switch interval and a time slice, well under one held encode call


def _stalled_fraction(fn) -> float:
    """The share of the time `fn` ran (3 calls, in another thread) in which this thread could not
    run a Python statement for over GAP_S."""
    done = threading.Event()

    def work() -> None:
        for _ in range(3):
            fn()
        done.set()

    thread = threading.Thread(target=work)
    started = last = time.perf_counter()
    stalled = 0.0
    thread.start()
    while not done.is_set():
        now = time.perf_counter()
        if now - last > GAP_S:
            stalled += now - last
        last = now
    thread.join()
    return stalled / (time.perf_counter() - started)


def test_encode_lets_other_threads_run(tiny_assets: TinyAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    # Long enough that one held call lasts several GAP_S even on a fast machine (at 1x it can
    # finish within one gap, and the control then reads low: 0.34 seen in CI).
    prompt = LONG_PROMPT * 4
    held = 0.0
    for _ in range(3):  # the control only: on a busy 2-core CI machine the worker thread itself can be
        # kept off the CPU while this one spins, and one reading came out 0.35 (the GIL held regardless)
        held = max(held, _stalled_fraction(lambda: tokenizer._tokenizer.encode(prompt)))
        if held > 0.5:
            break
    ours = _stalled_fraction(lambda: encode(tokenizer, prompt))
    assert held > 0.5, held  # the probe sees a GIL held through each call...
    assert ours < 0.25, ours  # ...and the routes' encode does not hold it


TEXTS = ["", "the model serves", "  spaces  and\ttabs\n", "émoji ✓ 数据", "<s> a </s> b", LONG_PROMPT[:5000]]


@pytest.mark.parametrize("special", [True, False])
def test_encode_with_a_limit_gives_transformers_ids(tiny_assets: TinyAssets, special: bool) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    for text in TEXTS:
        expected = tuple(tokenizer(text, add_special_tokens=special)["input_ids"])
        assert encode(tokenizer, text, special, max_tokens=10**6) == expected, text
        assert encode(tokenizer, text, special) == expected, text


def test_encode_refuses_a_prompt_over_the_limit_with_its_count(tiny_assets: TinyAssets) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets.tokenizer_dir)
    count = len(tokenizer(LONG_PROMPT)["input_ids"])
    assert encode(tokenizer, LONG_PROMPT, max_tokens=count) is not None  # exactly at the limit
    with pytest.raises(
        InvalidRequestError, match=f"the prompt has {count} tokens, more than max_input_tokens=100"
    ):
        encode(tokenizer, LONG_PROMPT, max_tokens=100)
