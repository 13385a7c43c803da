"""Helpers for the engine tests: the tiny checkpoints' PEFT adapters loaded into an engine."""

from __future__ import annotations

from typing import Any

from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.adapters.registry import AdapterEntry
from loraplex.server.engine import LLMEngine
from loraplex.server.sequence import AdapterRef


def add_tiny_adapters(engine: LLMEngine, assets: Any, kind: str) -> LLMEngine:
    """Register every adapter the tiny assets have for `kind` (generation 0); returns the engine."""
    for name, path in assets.adapters[kind].items():
        weights = load_peft_adapter(path, name, engine.runner.hf_config, engine.config.max_lora_rank)
        engine.add_adapter(AdapterEntry(AdapterRef(name, 0), weights, source=str(path)))
    return engine
