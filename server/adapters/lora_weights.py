"""An adapter's weights in the engine's own layout, independent of where they came from."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The projections a LoRA may target, in the engine's vocabulary (Hugging Face module names).
TARGET_MODULES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)


@dataclass
class LoraWeights:
    """Parsed, validated LoRA weights ready to be copied into slot buffers.

    `tensors[(layer_index, module)] = (A, B)` with `A: [r, in_features]`,
    `B: [out_features, r]`, scaling (alpha/r, or alpha/sqrt(r) for rsLoRA, per module
    with rank_pattern/alpha_pattern) already folded into B. Modules an adapter does not
    target are simply absent. Tensors live on the CPU until a slot copy.
    """

    name: str
    rank: int  # largest rank over all modules
    target_modules: tuple[str, ...]
    tensors: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    alpha: float | None = None
    base_model_name_or_path: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)

    @property
    def num_bytes(self) -> int:
        return sum(
            a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.tensors.values()
        )
