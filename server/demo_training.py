"""The demo's trained models: a tiny Llama pretrained on the project's own corpus, and four
LoRA fine-tunes of it, each on its own instruction set (`server/demo_corpus/`).

Everything runs on the CPU in about a minute (two quiet cores) with `transformers.Trainer`
and `peft`, from fixed seeds, and is cached under a folder named by a hash of the corpus and
of this code, so a second run only reads it back. The results are ordinary Hugging Face
artefacts: a `save_pretrained` checkpoint with its BPE tokenizer and chat template, and PEFT
adapter folders. They are tiny: they answer the corpus' questions in their own style and
know little else.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraplex.server import demo_corpus, demo_trainer
from loraplex.server.demo_assets import ALL_PROJECTIONS, TinyAssets, build_tokenizer
from loraplex.server.demo_corpus import Topic, load_sentences, load_topics
from loraplex.server.demo_trainer import IGNORE, Example, Report, Schedule, cpu_seconds, run_parallel, train

BASE_NAME = "tiny-llama"  # what the adapters record as their base (the demo's served name)
END = "<|end|>"  # closes every chat turn (CHAT_TEMPLATE); the model stops on it


@dataclass(frozen=True)
class BaseRecipe:
    """The base model's shape and its pretraining schedule."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    vocab_size: int = 1024
    epochs: int = 12
    chat_repeats: int = 4  # the chats matter most: each epoch shows them this often
    learning_rate: float = 4e-3
    batch_size: int = 16
    seed: int = 0


@dataclass(frozen=True)
class StyleRecipe:
    """One fine-tune: the style it answers in (a key of topics.json) and its LoRA shape."""

    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    epochs: int = 30
    learning_rate: float = 1e-2
    seed: int = 1


BASE = BaseRecipe()
NO_K = ("q_proj", "v_proj", "o_proj", "gate_proj", "up_proj")
STYLES: tuple[StyleRecipe, ...] = (
    StyleRecipe("sql", rank=16, alpha=32, target_modules=ALL_PROJECTIONS, epochs=20, seed=1),
    StyleRecipe("support", rank=16, alpha=32, target_modules=(*NO_K, "down_proj"), epochs=40, seed=2),
    StyleRecipe(
        "poem",
        rank=8,
        alpha=16,
        target_modules=("q_proj", "v_proj", "gate_proj", "up_proj"),
        epochs=36,
        seed=3,
    ),
    StyleRecipe("haiku", rank=12, alpha=24, target_modules=(*NO_K[1:], "down_proj"), epochs=30, seed=4),
)


@dataclass(frozen=True)
class TrainedAssets:
    """Where the trained artefacts are: the base (with its tokenizer) and one folder per style."""

    root: Path
    model_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)

    @property
    def tokenizer_dir(self) -> Path:
        return self.model_dir

    def as_tiny_assets(self, kind: str = "trained") -> TinyAssets:
        """The same files in the shape the random-weight fixtures have (one model kind), so a
        test parametrised over kinds runs on these too."""
        return TinyAssets(self.root, self.model_dir, {kind: self.model_dir}, {kind: dict(self.adapters)})


def assets_key() -> str:
    """Hash of what decides the output: the corpus and the code that trains on it."""
    digest = hashlib.sha256()
    code = [Path(module.__file__ or "") for module in (demo_trainer, demo_corpus)]
    corpus = sorted(path for path in demo_corpus.CORPUS_DIR.iterdir() if path.suffix in (".json", ".txt"))
    for path in [*corpus, Path(__file__), Path(__file__).with_name("demo_assets.py"), *code]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def default_root() -> Path:
    """`$LORAPLEX_DEMO_DIR`, else `$LORAPLEX_CACHE/demo-assets` (default `~/.cache/loraplex`)."""
    if os.environ.get("LORAPLEX_DEMO_DIR"):
        return Path(os.environ["LORAPLEX_DEMO_DIR"])
    return Path(os.environ.get("LORAPLEX_CACHE") or Path.home() / ".cache" / "loraplex") / "demo-assets"


def _layout(root: Path) -> TrainedAssets:
    return TrainedAssets(
        root=root,
        model_dir=root / BASE_NAME,
        adapters={style.name: root / "adapters" / style.name for style in STYLES},
    )


def is_built(root: Path | None = None) -> bool:
    return (Path(root or default_root()) / assets_key() / ".complete").is_file()


def build_trained_assets(root: Path | None = None, report: Report = print) -> TrainedAssets:
    """Train (or reuse, when already complete) everything under `root/<assets_key()>`."""
    final = Path(root or default_root()) / assets_key()
    if (final / ".complete").is_file():
        return _layout(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".training-", dir=final.parent))
    assets = _layout(staging)
    started = time.monotonic()
    _quiet_transformers()
    topics, sentences = load_topics(), load_sentences()
    _build_tokenizer(assets.model_dir, topics, sentences)
    pretrain_base(assets.model_dir, topics, sentences, report)
    jobs = sorted(STYLES, key=lambda style: style.epochs, reverse=True)  # longest first
    run_parallel(
        finetune_style, [(assets.model_dir, s, topics, assets.adapters[s.name]) for s in jobs], report
    )
    timing = {"seconds": round(time.monotonic() - started, 1), "cpu_seconds": round(cpu_seconds(), 1)}
    (staging / ".complete").write_text(json.dumps(timing))
    try:
        staging.rename(final)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return _layout(final)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _build_tokenizer(out_dir: Path, topics: list[Topic], sentences: list[str]) -> None:
    texts = [
        *sentences,
        *(q for t in topics for q in t.questions),
        *(a for t in topics for a in t.answers.values()),
    ]
    build_tokenizer(out_dir, vocab_size=BASE.vocab_size, texts=texts)


# --- examples ---------------------------------------------------------------------------------


def chat_example(tokenizer: Any, question: str, answer: str) -> Example:
    """Token ids of one chat turn, exactly as the server renders the prompt, with the loss on
    the answer (and its closing END) only."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
    )
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    answer_ids = tokenizer.encode(answer + END, add_special_tokens=False)
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE] * len(prompt_ids) + answer_ids}


def document_example(tokenizer: Any, text: str) -> Example:
    ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]
    return {"input_ids": ids, "labels": list(ids)}


def base_examples(tokenizer: Any, topics: list[Topic], sentences: list[str]) -> list[Example]:
    """Plain English documents (the corpus' sentences and every style's texts, as a base model
    sees SQL and verse in its pretraining) and plain chat answers to the questions."""
    documents = [*sentences, *(text for t in topics for text in t.answers.values())]
    chats = [chat_example(tokenizer, q, t.answers["answer"]) for t in topics for q in t.questions]
    return [document_example(tokenizer, text) for text in documents] + chats * BASE.chat_repeats


def style_examples(tokenizer: Any, style: str, topics: list[Topic]) -> list[Example]:
    return [chat_example(tokenizer, q, t.answers[style]) for t in topics for q in t.questions]


# --- training ---------------------------------------------------------------------------------


def llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    end_id = tokenizer.convert_tokens_to_ids(END)
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=BASE.hidden_size,
        intermediate_size=BASE.intermediate_size,
        num_hidden_layers=BASE.num_hidden_layers,
        num_attention_heads=BASE.num_attention_heads,
        num_key_value_heads=BASE.num_key_value_heads,
        head_dim=BASE.hidden_size // BASE.num_attention_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[end_id, tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )


def pretrain_base(model_dir: Path, topics: list[Topic], sentences: list[str], report: Report) -> None:
    """Train the base from random weights and save it (float32 safetensors) next to its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = llama_config(tokenizer)
    torch.manual_seed(BASE.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    examples = base_examples(tokenizer, topics, sentences)
    schedule = Schedule(BASE.epochs, BASE.learning_rate, BASE.seed, BASE.batch_size)
    train(model, examples, tokenizer.pad_token_id, schedule, "base", report)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(model_dir, safe_serialization=True)


def finetune_style(model_dir: Path, style: StyleRecipe, topics: list[Topic], out_dir: Path) -> None:
    """A LoRA on the frozen base, trained on the style's answers; saved as a PEFT folder.
    Runs in a worker of `run_parallel`: its progress goes to `worker_report()`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(style.seed)
    config = LoraConfig(
        r=style.rank,
        lora_alpha=style.alpha,
        target_modules=list(style.target_modules),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft calls a transformers method deprecated for v6
        warnings.simplefilter("ignore", FutureWarning)
        model = get_peft_model(base, config)
    examples = style_examples(tokenizer, style.name, topics)
    schedule = Schedule(style.epochs, style.learning_rate, style.seed, BASE.batch_size)
    train(model, examples, tokenizer.pad_token_id, schedule, style.name, demo_trainer.worker_report())
    model.save_pretrained(out_dir, safe_serialization=True)
    # PEFT records the local temp path; record the base's served name, as a hub adapter would.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = BASE_NAME
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
