"""Tiny, deterministic models, tokenizer and LoRA adapters built by code.

Used by the tests (as fixtures), by `loraplex serve --demo` and by the local demo cluster:
model weights can't be downloaded there, so everything is generated from fixed seeds. The
results are real Hugging Face artefacts: checkpoints written with `save_pretrained`
(safetensors), a BPE tokenizer trained with `tokenizers` that `AutoTokenizer` loads (with a
chat template), and PEFT adapters (`adapter_config.json` + `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Bump when anything below changes what gets written: cached asset trees are keyed by it.
ASSETS_VERSION = "1"

SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@dataclass(frozen=True)
class AdapterRecipe:
    """How one demo adapter is made: rank, alpha, which projections, and its seed."""

    name: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    seed: int
    use_rslora: bool = False


ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
ALL_PROJECTIONS = (*ATTENTION, "gate_proj", "up_proj", "down_proj")
ADAPTER_RECIPES: tuple[AdapterRecipe, ...] = (
    AdapterRecipe("a4", rank=4, alpha=8, target_modules=("q_proj", "v_proj"), seed=11),
    AdapterRecipe("b8", rank=8, alpha=16, target_modules=ALL_PROJECTIONS, seed=12),
    AdapterRecipe("c16", rank=16, alpha=16, target_modules=ALL_PROJECTIONS, seed=13, use_rslora=True),
)


@dataclass(frozen=True)
class TinyAssets:
    """Where the generated artefacts are. Model dirs also hold the tokenizer files."""

    root: Path
    tokenizer_dir: Path
    models: dict[str, Path] = field(default_factory=dict)
    adapters: dict[str, dict[str, Path]] = field(default_factory=dict)


def _corpus() -> list[str]:
    """A small built-in corpus: enough for a BPE with a few hundred merges."""
    subjects = ("the model", "a request", "the adapter", "each pod", "the scheduler", "a team", "the cluster")
    verbs = ("serves", "loads", "answers", "streams", "batches", "routes", "caches", "schedules")
    objects = (
        "many tokens",
        "a fine-tune",
        "the base weights",
        "every prompt",
        "small adapters",
        "the queue",
    )
    endings = ("quickly.", "on one GPU.", "without a restart.", "in one batch.", "for every user.", "today.")
    lines = [
        f"{s} {v} {o} {e}"
        for i, s in enumerate(subjects)
        for j, v in enumerate(verbs)
        for k, o in enumerate(objects)
        for e in endings[(i + j + k) % len(endings) : (i + j + k) % len(endings) + 2]
    ]
    lines += [
        "Low-rank adaptation adds two small matrices to each projection of a transformer.",
        "Kubernetes operators reconcile the desired state with what the cluster reports.",
        "def add(a, b):\n    return a + b\n",
        "SELECT name, count(*) FROM users GROUP BY name;",
        "Hello! How can I help you today? Please write a short poem about the sea.",
        '0 1 2 3 4 5 6 7 8 9 10 100 1000, 3.14; {"key": [1, 2]}',
    ]
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 512, texts: list[str] | None = None) -> Path:
    """Train a byte-level BPE on `texts` (default: the built-in corpus) and save it for AutoTokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((texts or _corpus()) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return out_dir


def _tiny_configs(vocab_size: int, bos_id: int, eos_id: int, pad_id: int) -> dict[str, object]:
    from transformers import Gemma2Config, LlamaConfig

    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        initializer_range=0.1,  # larger than real models so greedy outputs vary with the input
        tie_word_embeddings=False,
    )
    gemma2 = Gemma2Config(
        **{**common, "tie_word_embeddings": True},
        sliding_window=8,  # tiny so that test prompts exceed it
        query_pre_attn_scalar=16,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        hidden_activation="gelu_pytorch_tanh",
    )
    return {"llama": LlamaConfig(**common, rope_theta=10000.0), "gemma2": gemma2}


def build_model(kind: str, config: object, tokenizer_dir: Path, out_dir: Path, seed: int) -> Path:
    """Random weights from a fixed seed, saved as a float32 safetensors checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(out_dir, safe_serialization=True)
    for item in tokenizer_dir.iterdir():
        shutil.copy(item, out_dir / item.name)
    return out_dir


def build_adapter(model_dir: Path, recipe: AdapterRecipe, out_dir: Path, base_name: str) -> Path:
    """A PEFT LoRA with random, non-zero A and B so the adapter really changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.target_modules),
        use_rslora=recipe.use_rslora,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    generator = torch.Generator().manual_seed(recipe.seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.15)
    model.save_pretrained(out_dir, safe_serialization=True)
    # PEFT records the local temp path; record the base's stable name instead, as a hub adapter would.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    return out_dir


def _layout(root: Path) -> TinyAssets:
    kinds = ("llama", "gemma2")
    return TinyAssets(
        root=root,
        tokenizer_dir=root / "tokenizer",
        models={kind: root / "models" / f"tiny-{kind}" for kind in kinds},
        adapters={
            kind: {r.name: root / "adapters" / f"tiny-{kind}" / r.name for r in ADAPTER_RECIPES}
            for kind in kinds
        },
    )


def build_tiny_assets(root: Path) -> TinyAssets:
    """Build (or reuse, when already complete) every artefact under `root/v<ASSETS_VERSION>`."""
    from transformers import AutoTokenizer

    final = Path(root) / f"v{ASSETS_VERSION}"
    if (final / ".complete").exists():
        return _layout(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=final.parent))
    assets = _layout(staging)
    build_tokenizer(assets.tokenizer_dir)
    tokenizer = AutoTokenizer.from_pretrained(assets.tokenizer_dir)
    configs = _tiny_configs(
        len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    )
    for seed, (kind, model_dir) in enumerate(assets.models.items()):
        build_model(kind, configs[kind], assets.tokenizer_dir, model_dir, seed=seed)
        for recipe in ADAPTER_RECIPES:
            build_adapter(model_dir, recipe, assets.adapters[kind][recipe.name], base_name=f"tiny-{kind}")
    (staging / ".complete").write_text(ASSETS_VERSION)
    try:
        staging.rename(final)
    except OSError:  # another process finished first: keep theirs
        shutil.rmtree(staging, ignore_errors=True)
    return _layout(final)
