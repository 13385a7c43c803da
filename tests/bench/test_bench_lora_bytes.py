"""bench/lora_bytes.py: its projection shapes are those of the real Llama layer, and it runs."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

BENCH = Path(__file__).resolve().parents[2] / "bench"

PROJECTIONS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]  # fmt: skip


def test_projection_shapes_match_transformers_llama_layer() -> None:
    sys.path.insert(0, str(BENCH))
    try:
        bench = importlib.import_module("lora_bytes")
    finally:
        sys.path.remove(str(BENCH))
    config = {"hidden_size": 48, "intermediate_size": 80, "num_attention_heads": 6, "num_key_value_heads": 2,
              "head_dim": 16, "num_hidden_layers": 1}  # fmt: skip
    layer = LlamaDecoderLayer(LlamaConfig(**config), layer_idx=0)
    modules = dict(layer.named_modules())
    expected = [(modules[n].in_features, modules[n].out_features) for n in PROJECTIONS]
    assert bench.projection_shapes(config) == expected
    assert expected[0] == (48, 96)  # head_dim x heads differs from hidden: the config's head_dim is read


def test_script_reports_the_bytes_it_reads() -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH / "lora_bytes.py"), "--adapters", "2", "--rank", "4", "--repeats", "1"],
        capture_output=True, text=True, check=True, timeout=300,
    )  # fmt: skip
    report = json.loads(result.stdout)
    # SmolLM-135M: 30 layers, per layer sum(in + out) over the 7 projections = 10176, float32
    assert report["lora_mb_per_step"] == round(2 * 4 * 10176 * 30 * 4 / 1e6, 1)
    assert report["bare_bmm_ms_per_step"] > 0 and report["read_gb_s"] > 0
