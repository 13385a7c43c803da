"""Read and validate a PEFT LoRA adapter directory into `LoraWeights` (scaling folded into B)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.models import lora_module_shapes

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

# Options that change the math beyond plain LoRA: refused when set (truthy).
_UNSUPPORTED_OPTIONS: dict[str, str] = {
    "use_dora": "DoRA (use_dora)",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D bases)",
    "lora_bias": "LoRA bias (lora_bias)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "layer_replication": "layer replication",
    "target_parameters": "target_parameters",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "use_qalora": "QA-LoRA (use_qalora)",
}
_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn"}
_TENSOR_NAME = re.compile(r"(?:^|\.)layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class AdapterValidationError(ValueError):
    """The adapter can't be served by this base model; the message says why, `error_type` names it.

    error_type: validation (not a PEFT LoRA dir, bad config), unsupported (DoRA and other
    variants), rank_exceeds_max, unknown_target_module, shape_mismatch, corrupt_file.
    """

    def __init__(self, message: str, error_type: str = "validation") -> None:
        super().__init__(message)
        self.error_type = error_type


def _module_key(layer: int, module: str) -> str:
    """The module's name inside the base model, what PEFT matches rank_pattern/alpha_pattern against."""
    return f"model.layers.{layer}.{_PARENT.get(module, 'mlp')}.{module}"


def _pattern_value(patterns: dict, key: str, default: float) -> float:
    for pattern, value in patterns.items():  # same rule as peft.utils.other.get_pattern_key
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _read_config(path: Path) -> dict:
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterValidationError(f"{path}: no {CONFIG_FILE}, not a PEFT adapter directory")
    try:
        config = json.loads(config_path.read_bytes())
    except (ValueError, RecursionError) as exc:  # bad JSON, bad UTF-8, too deep, too many digits
        raise AdapterValidationError(f"{config_path}: invalid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterValidationError(f"{config_path}: expected a JSON object, got {type(config).__name__}")
    _check_config_types(config)
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise AdapterValidationError(f"only LoRA adapters are supported, this one is peft_type={peft_type!r}")
    for option, what in _UNSUPPORTED_OPTIONS.items():
        if config.get(option):
            raise AdapterValidationError(f"{what} is not supported, plain LoRA only", "unsupported")
    if config.get("bias", "none") != "none":
        raise AdapterValidationError(f"trained biases (bias={config['bias']!r}) are not supported")
    return config


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_config_types(config: dict) -> None:
    """The fields the loader reads have the types PEFT writes; anything else is a typed refusal."""
    targets = config.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise AdapterValidationError(f"target_modules must be a string or a list of strings, got {targets!r}")
    if "lora_alpha" in config and not _is_number(config["lora_alpha"]):
        raise AdapterValidationError(f"lora_alpha must be a finite number, got {config['lora_alpha']!r}")
    for name, check in (("rank_pattern", _is_positive_int), ("alpha_pattern", _is_number)):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict) or not all(check(v) for v in patterns.values()):
            raise AdapterValidationError(f"{name} must map module patterns to numbers, got {patterns!r}")
        for pattern in patterns:
            _compile(pattern, name)
    if isinstance(targets, str):
        _compile(targets, "target_modules")
    for name in ("peft_type", "base_model_name_or_path", "bias"):
        if config.get(name) is not None and not isinstance(config[name], str):
            raise AdapterValidationError(f"{name} must be a string, got {config[name]!r}")


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _compile(pattern: str, field: str) -> None:
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterValidationError(
            f"{field}: {pattern!r} is not a valid regular expression ({exc})"
        ) from exc


def _target_modules(config: dict, known: dict[str, tuple[int, int]], num_layers: int, arch: str) -> set[str]:
    targets = config.get("target_modules")
    if targets == "all-linear":
        return set(known)
    if isinstance(targets, str):  # PEFT: a regex over full module names
        found = {m for m in known if any(re.fullmatch(targets, _module_key(i, m)) for i in range(num_layers))}
        if not found:
            raise AdapterValidationError(
                f"target_modules regex {targets!r} matches no projection of {arch}", "unknown_target_module"
            )
        return found
    if not targets:
        raise AdapterValidationError("adapter_config.json lists no target_modules")
    unknown = [t for t in targets if t.rsplit(".", 1)[-1] not in known]
    if unknown:
        raise AdapterValidationError(
            f"target modules {unknown} are not LoRA-capable projections of {arch} "
            f"(supported: {', '.join(known)})",
            "unknown_target_module",
        )
    return {t.rsplit(".", 1)[-1] for t in targets}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise AdapterValidationError(f"{path}: no {WEIGHTS_FILE} (only safetensors adapters are loaded)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as exc:  # SafetensorError, OSError, and whatever a hostile header provokes
        raise AdapterValidationError(
            f"{weights_path}: unreadable safetensors ({exc})", "corrupt_file"
        ) from exc
    for name, tensor in tensors.items():
        if not tensor.is_floating_point():
            raise AdapterValidationError(
                f"{weights_path}: tensor {name!r} is {tensor.dtype}, not a float", "corrupt_file"
            )
    return tensors


def _pair_tensors(tensors: dict[str, torch.Tensor], targets: set[str], num_layers: int) -> dict:
    """{(layer, module): {"A": tensor, "B": tensor}} from PEFT tensor names."""
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = _TENSOR_NAME.search(name)
        if match is None:
            raise AdapterValidationError(
                f"unexpected tensor {name!r}: not a LoRA weight of a decoder projection"
            )
        layer, _, module, side = int(match[1]), match[2], match[3], match[4]
        if module not in targets:
            raise AdapterValidationError(
                f"tensor {name!r} targets {module}, which target_modules does not list"
            )
        if layer >= num_layers:
            raise AdapterValidationError(
                f"tensor {name!r}: layer {layer}, the base model has {num_layers}", "shape_mismatch"
            )
        pairs.setdefault((layer, module), {})[side] = tensor
    if not pairs:
        raise AdapterValidationError(f"no LoRA weights for target modules {sorted(targets)}")
    for (layer, module), pair in pairs.items():
        if set(pair) != {"A", "B"}:
            raise AdapterValidationError(f"layer {layer} {module}: lora_A and lora_B must both be present")
    return pairs


def _fold(config: dict, key: tuple[int, str], pair: dict, shape: tuple[int, int], max_rank: int):
    """Check shapes and rank of one module, return (A, B * scaling) in float32."""
    layer, module = key
    module_key = _module_key(layer, module)
    rank = int(_pattern_value(config.get("rank_pattern") or {}, module_key, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module_key, config.get("lora_alpha", 8)))
    if rank > max_rank:
        raise AdapterValidationError(
            f"{module_key}: rank {rank} exceeds the server's max LoRA rank {max_rank}", "rank_exceeds_max"
        )
    a, b = pair["A"], pair["B"]
    in_features, out_features = shape
    if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
        raise AdapterValidationError(
            f"{module_key}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
            f"(expected ({rank}, {in_features}) / ({out_features}, {rank})): trained for another model?",
            "shape_mismatch",
        )
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    a, b = a.float().contiguous(), (b.float() * scaling).contiguous()
    for side, tensor in (("lora_A", a), ("lora_B x scaling", b)):
        if not bool(torch.isfinite(tensor).all()):
            raise AdapterValidationError(
                f"{module_key}: {side} holds NaN or inf values (a diverged or corrupted training run)",
                "corrupt_file",
            )
    return a, b


def load_peft_adapter(path: str | Path, name: str, model_config, max_rank: int) -> LoraWeights:
    """Read, validate and convert a PEFT LoRA adapter for the base model described by `model_config`."""
    path = Path(path)
    config = _read_config(path)
    architecture = (getattr(model_config, "architectures", None) or ["?"])[0]
    try:
        shapes = lora_module_shapes(model_config)
    except ValueError as exc:
        raise AdapterValidationError(str(exc)) from exc
    if not _is_positive_int(config.get("r")):
        raise AdapterValidationError(
            f"adapter_config.json: r must be a positive integer, got {config.get('r')!r}"
        )
    if config["r"] > max_rank:
        raise AdapterValidationError(
            f"rank r={config['r']} exceeds the server's max LoRA rank {max_rank}", "rank_exceeds_max"
        )
    targets = _target_modules(config, shapes, model_config.num_hidden_layers, architecture)
    pairs = _pair_tensors(_read_tensors(path), targets, model_config.num_hidden_layers)
    tensors = {key: _fold(config, key, pair, shapes[key[1]], max_rank) for key, pair in sorted(pairs.items())}
    return LoraWeights(
        name=name,
        rank=max(a.shape[0] for a, _ in tensors.values()),
        target_modules=tuple(sorted({module for _, module in tensors}, key=list(shapes).index)),
        tensors=tensors,
        alpha=float(config.get("lora_alpha", config["r"])),
        base_model_name_or_path=config.get("base_model_name_or_path"),
        metadata={"peft_version": config.get("peft_version"), "use_rslora": bool(config.get("use_rslora"))},
    )
