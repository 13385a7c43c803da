"""Write a random-weight Hugging Face checkpoint of a given config, plus random PEFT adapters.

Weights can't be downloaded where the benchmarks run, and speed depends on shapes, not values:
this writes `config.json` + `model.safetensors` (names and shapes from transformers' own model
class, built on the meta device), a word-level tokenizer covering the whole vocabulary (token
`w<id>` is id `<id>`, so prompts are synthetic token ids), and PEFT LoRA directories
(`adapter_config.json` + `adapter_model.safetensors`) on the projections asked for.

The checkpoint has no EOS token: every request generates exactly the tokens it asks for, on
every API (TGI has no `ignore_eos`) and in the transformers / PEFT baselines.

    python bench/random_checkpoint.py --config bench/configs/gemma-2-2b-config.json \
        --out /tmp/gemma-2-2b-random --adapters 64 --rank 16
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
_INIT_STD = 0.02  # as real checkpoints are initialised: activations stay finite in bf16
_NO_EOS = ("eos_token_id", "bos_token_id", "pad_token_id")


@dataclass(frozen=True)
class CheckpointSpec:
    config_path: Path
    out: Path
    dtype: torch.dtype = torch.bfloat16
    seed: int = 0
    device: str = "cpu"  # where random numbers are drawn (cuda is much faster for 2B+ params)


def read_config(path: Path) -> dict:
    """The config with EOS/BOS/PAD removed (see the module docstring) and no stale dtype."""
    config = json.loads(Path(path).read_text())
    for key in _NO_EOS:
        config[key] = None
    config.pop("torch_dtype", None)
    return config


def parameter_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes, as transformers' model class for this config names them."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if hf_config.tie_word_embeddings:
        shapes.pop("lm_head.weight", None)  # tied to the embedding, as save_pretrained writes it
    return shapes


def _random(shape: tuple[int, ...], std: float, spec: CheckpointSpec, gen: torch.Generator) -> torch.Tensor:
    tensor = torch.empty(shape, dtype=torch.float32, device=spec.device).normal_(0.0, std, generator=gen)
    return tensor.to(spec.dtype).cpu()


def write_model(spec: CheckpointSpec) -> Path:
    """Random weights (norm weights near 0 or 1 alike are fine: values don't change the speed)."""
    config = read_config(spec.config_path)
    spec.out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=spec.device).manual_seed(spec.seed)
    tensors = {name: _random(shape, _INIT_STD, spec, gen) for name, shape in parameter_shapes(config).items()}
    save_file(tensors, str(spec.out / "model.safetensors"), metadata={"format": "pt"})
    config["torch_dtype"] = str(spec.dtype).removeprefix("torch.")
    (spec.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_tokenizer(config["vocab_size"], spec.out)
    return spec.out


def write_tokenizer(vocab_size: int, out: Path) -> None:
    """A word-level tokenizer with one word per id: `w17 w5` encodes to [17, 5], decodes back."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    # No special tokens at all: decoding must never drop a generated id (w0 stays "w0").
    PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(out)


def projection_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA target projection."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def adapter_bytes(config: dict, rank: int, targets: tuple[str, ...], bytes_per_value: int = 2) -> int:
    """Bytes of one adapter's A and B over all layers (DESIGN §9: 41.5 MB for Gemma-2-2B, r16, all 7)."""
    shapes = projection_shapes(config)
    per_layer = sum(rank * (shapes[m][0] + shapes[m][1]) for m in targets)
    return per_layer * config["num_hidden_layers"] * bytes_per_value


def write_adapter(spec: CheckpointSpec, out: Path, rank: int, targets: tuple[str, ...], seed: int) -> Path:
    """A PEFT LoRA with random A and B (B small, so the base output is shifted, not swamped)."""
    config = read_config(spec.config_path)
    shapes = projection_shapes(config)
    gen = torch.Generator(device=spec.device).manual_seed(seed)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            in_features, out_features = shapes[module]
            key = f"base_model.model.model.layers.{layer}.{_PARENT.get(module, 'mlp')}.{module}"
            tensors[f"{key}.lora_A.weight"] = _random((rank, in_features), in_features**-0.5, spec, gen)
            tensors[f"{key}.lora_B.weight"] = _random((out_features, rank), _INIT_STD, spec, gen)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "target_modules": list(targets),
        "base_model_name_or_path": spec.out.name,
    }
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return out


def write_adapters(spec: CheckpointSpec, count: int, rank: int, targets: tuple[str, ...]) -> list[Path]:
    """`count` distinct adapters under `<out>/adapters/a<i>` (seeds differ per adapter)."""
    root = spec.out / "adapters"
    return [write_adapter(spec, root / f"a{i}", rank, targets, spec.seed + 1 + i) for i in range(count)]


def ensure_checkpoint(
    spec: CheckpointSpec, num_adapters: int, rank: int, targets=ALL_PROJECTIONS
) -> list[Path]:
    """Write what is missing (a complete model or adapter dir is reused); the adapter dirs."""
    if not (spec.out / "config.json").exists():
        write_model(spec)
    paths = []
    for i in range(num_adapters):
        path = spec.out / "adapters" / f"a{i}"
        if not (path / "adapter_config.json").exists():
            write_adapter(spec, path, rank, targets, spec.seed + 1 + i)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=ROOT / "bench" / "configs" / "gemma-2-2b-config.json")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--adapters", type=int, default=32, help="number of distinct adapters")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--targets", default=",".join(ALL_PROJECTIONS))
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    spec = CheckpointSpec(args.config, args.out, getattr(torch, args.dtype), args.seed, args.device)
    paths = ensure_checkpoint(spec, args.adapters, args.rank, tuple(args.targets.split(",")))
    print(f"wrote {args.out} and {len(paths)} adapters under {args.out / 'adapters'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
