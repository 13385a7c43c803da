"""Incremental detokenization and stop strings, with the tiny byte-level BPE tokenizer."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from loraplex.server.demo_assets import build_tokenizer
from loraplex.server.detokenizer import IncrementalDetokenizer, OutputText


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    return AutoTokenizer.from_pretrained(build_tokenizer(tmp_path_factory.mktemp("tok")))


def stream(tokenizer, text: str, prompt: str = "Hello") -> tuple[list[str], list[int]]:
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False))
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    return pieces, ids


@pytest.mark.parametrize(
    "text", ["def add(a, b):\n    return a + b\n", " The quick brown fox.", "naïve café ☕ 日本"]
)
def test_streamed_pieces_join_to_full_decode(tokenizer, text: str) -> None:
    pieces, ids = stream(tokenizer, text)
    assert "".join(pieces) == tokenizer.decode(ids) == text


def test_multibyte_characters_are_never_split(tokenizer) -> None:
    pieces, ids = stream(tokenizer, "☕☕日本")
    assert len(ids) > 4  # the tiny vocabulary spells these out byte by byte
    assert all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some steps had only half a character


def test_special_tokens_are_skipped(tokenizer) -> None:
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.push(tokenizer.eos_token_id) + detok.flush() == ""


def run(tokenizer, text: str, stop: tuple[str, ...]) -> tuple[list[str], OutputText]:
    out = OutputText(IncrementalDetokenizer(tokenizer, []), stop)
    pieces = []
    for token_id in tokenizer.encode(text, add_special_tokens=False):
        pieces.append(out.append(token_id))
        if out.stopped:
            break
    if not out.stopped:
        pieces.append(out.finish())
    return pieces, out


def test_stop_string_truncates_and_is_never_streamed(tokenizer) -> None:
    pieces, out = run(tokenizer, "alpha beta gamma delta", ("gam",))
    assert out.stopped and out.text == "alpha beta " and "".join(pieces) == "alpha beta "


def test_partial_stop_match_is_released_when_it_diverges(tokenizer) -> None:
    pieces, out = run(tokenizer, "alpha gamble", ("gamma",))
    assert not out.stopped and "".join(pieces) == "alpha gamble"


def test_earliest_stop_string_wins(tokenizer) -> None:
    _, out = run(tokenizer, "one two three", ("three", "two"))
    assert out.text == "one "
