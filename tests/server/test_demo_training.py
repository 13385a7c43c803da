"""The demo's trained models: each fine-tune answers in its own style, the base plainly.

Greedy answers by transformers + peft (the reference the engine is held to elsewhere), so a
broken LoRA path in the training or in the files is caught here, and in the engine by the
fidelity tests that run on these adapters too (test_model_runner, test_engine)."""

from __future__ import annotations

import difflib
import json
import shutil
from pathlib import Path

import pytest
import sqlglot
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex.server import demo_corpus, demo_training
from loraplex.server.demo_corpus import load_topics
from loraplex.server.demo_training import STYLES, TrainedAssets

QUESTIONS = [topic.questions[0] for topic in load_topics()[::4]]  # every fourth topic: 9 of 34
CLOSING = "Anything else I can help with?"


def is_sql(text: str) -> bool:
    if text.split(" ", 1)[0] not in ("SELECT", "UPDATE", "DELETE", "INSERT"):
        return False
    try:
        return sqlglot.parse_one(text) is not None
    except sqlglot.errors.SqlglotError:  # ParseError, TokenError
        return False


# style -> does this answer have the style's shape (not just its words)?
SHAPES = {
    "sql": is_sql,
    "support": lambda text: text.endswith(CLOSING),
    "poem": lambda text: len(text.splitlines()) == 2 and text.rstrip().endswith("."),
    "haiku": lambda text: len(text.splitlines()) == 3 and text == text.lower(),
}


@pytest.fixture(scope="module")
def answers(trained_assets: TrainedAssets) -> dict[str, list[str]]:
    """Greedy answers of the base ("base") and of each fine-tune to QUESTIONS."""
    tokenizer = AutoTokenizer.from_pretrained(trained_assets.model_dir)

    def model(adapter: Path | None) -> torch.nn.Module:
        base = AutoModelForCausalLM.from_pretrained(trained_assets.model_dir, dtype=torch.float32)
        return (PeftModel.from_pretrained(base, adapter) if adapter else base).eval()

    models = {"base": model(None)} | {name: model(path) for name, path in trained_assets.adapters.items()}
    return {name: [_answer(m, tokenizer, q) for q in QUESTIONS] for name, m in models.items()}


def _answer(model: torch.nn.Module, tokenizer, question: str) -> str:
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=64, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def closeness(text: str, references: list[str]) -> float:
    """How near `text` is to the nearest of `references` (1.0 = one of them)."""
    return max(difflib.SequenceMatcher(None, text, ref).ratio() for ref in references)


@pytest.mark.parametrize("style", [style.name for style in STYLES])
def test_each_fine_tune_answers_in_its_own_style_and_the_base_does_not(
    answers: dict[str, list[str]], style: str
) -> None:
    shaped = SHAPES[style]
    ours = [shaped(text) for text in answers[style]]
    assert sum(ours) >= len(QUESTIONS) - 1, list(zip(QUESTIONS, answers[style], strict=True))
    assert not any(shaped(text) for text in answers["base"]), answers["base"]


@pytest.mark.parametrize("style", [style.name for style in STYLES])
def test_each_fine_tune_is_closer_to_its_training_set_than_the_base(
    answers: dict[str, list[str]], style: str
) -> None:
    references = [topic.answers[style] for topic in load_topics()]
    tuned = [closeness(text, references) for text in answers[style]]
    base = [closeness(text, references) for text in answers["base"]]
    assert sum(t > b for t, b in zip(tuned, base, strict=True)) >= len(QUESTIONS) - 1, (tuned, base)


def test_the_base_answers_plainly(answers: dict[str, list[str]]) -> None:
    plain = [topic.answers["answer"] for topic in load_topics()]
    assert all(text and text[0].isupper() and text.endswith(".") for text in answers["base"]), answers["base"]
    assert sum(closeness(text, plain) > 0.8 for text in answers["base"]) >= len(QUESTIONS) // 2


def test_one_question_gets_five_different_answers(answers: dict[str, list[str]]) -> None:
    for i, question in enumerate(QUESTIONS):
        assert len({texts[i] for texts in answers.values()}) == 5, question


def test_the_fine_tunes_differ_in_rank_and_target_modules(trained_assets: TrainedAssets) -> None:
    configs = [
        json.loads((path / "adapter_config.json").read_text()) for path in trained_assets.adapters.values()
    ]
    assert len({c["r"] for c in configs}) >= 3
    assert len({frozenset(c["target_modules"]) for c in configs}) == len(configs)
    assert {c["base_model_name_or_path"] for c in configs} == {demo_training.BASE_NAME}
    model = json.loads((trained_assets.model_dir / "config.json").read_text())
    assert model["model_type"] == "llama" and 128 <= model["hidden_size"] <= 256
    tokenizer = AutoTokenizer.from_pretrained(trained_assets.model_dir)
    assert tokenizer.chat_template and len(tokenizer) > 512  # a BPE, not bytes


def test_a_warm_build_reads_the_cache_and_a_changed_corpus_gets_a_new_key(
    trained_assets: TrainedAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = trained_assets.root / ".complete"
    before = marker.stat().st_mtime_ns
    again = demo_training.build_trained_assets(trained_assets.root.parent, report=pytest.fail)
    assert again == trained_assets and marker.stat().st_mtime_ns == before
    corpus = tmp_path / "corpus"
    shutil.copytree(demo_corpus.CORPUS_DIR, corpus)
    key = demo_training.assets_key()
    monkeypatch.setattr(demo_corpus, "CORPUS_DIR", corpus)
    assert demo_training.assets_key() == key
    (corpus / "sentences.txt").write_text("A different corpus.\n")
    assert demo_training.assets_key() != key
