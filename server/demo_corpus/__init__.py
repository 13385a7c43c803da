"""The demo's training corpus, written by the project: `sentences.txt` (plain English over the
demo's themes) and `topics.json` (questions, each with a plain answer and one answer per
fine-tune style). Read by `loraplex.server.demo_training`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CORPUS_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Topic:
    questions: tuple[str, ...]
    answers: dict[str, str]  # style ("answer" = the base's plain one, "sql", ...) -> text


def load_topics(corpus_dir: Path = CORPUS_DIR) -> list[Topic]:
    raw = json.loads((corpus_dir / "topics.json").read_text())
    return [
        Topic(tuple(item.pop("questions")), {key: str(value) for key, value in item.items()}) for item in raw
    ]


def load_sentences(corpus_dir: Path = CORPUS_DIR) -> list[str]:
    return [line for line in (corpus_dir / "sentences.txt").read_text().splitlines() if line.strip()]
