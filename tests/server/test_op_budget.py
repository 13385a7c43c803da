"""The GPU code path's launch budget, counted on the CPU: Triton kernels in the interpreter.

One decode step of a mixed batch (base and three adapters) through the tiny models with every
backend on Triton: each decoder layer launches at most 20 device ops (Llama) or 24 (Gemma-2),
and the model runner's step never makes the host wait for the device.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels.op_count import OpCounter
from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_runner import ModelRunner, RunnerConfig

BUDGET = {"llama": 20, "gemma2": 24}
BLOCK = 4


@pytest.fixture
def triton_runner(request, tiny_assets, monkeypatch: pytest.MonkeyPatch) -> ModelRunner:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    monkeypatch.setenv("LORAPLEX_ATTENTION", "triton")
    kind = request.param
    runner = ModelRunner(
        RunnerConfig(
            model_path=str(tiny_assets.models[kind]), block_size=BLOCK, num_kv_blocks=64, max_lora_rank=16,
            max_num_seqs=8, max_batch_tokens=64, dtype="float32",
        )
    )  # fmt: skip
    for slot, name in enumerate(("a4", "b8", "c16")):
        runner.load_lora(
            slot, load_peft_adapter(tiny_assets.adapters[kind][name], name, runner.hf_config, 16)
        )
    monkeypatch.delenv("LORAPLEX_KERNELS")  # chosen once, at construction: the step must not read them
    monkeypatch.delenv("LORAPLEX_ATTENTION")
    runner.kind = kind
    return runner


def _decode_batch(runner: ModelRunner) -> ForwardBatch:
    """Prefill four sequences (base, a4, b8, c16), then the batch that decodes one token of each."""
    prompts = [(5, 6, 7, 8, 9), (10, 11, 12), (13, 14, 15, 16, 17, 18), (19, 20)]
    slots = (None, 0, 1, 2)
    tables = [(4 * i, 4 * i + 1) for i in range(4)]
    prefill = [SequenceChunk(i, p, 0, tables[i], slots[i]) for i, p in enumerate(prompts)]
    runner.execute(ForwardBatch(tuple(prefill)))
    decode = [
        SequenceChunk(i, (3,), len(p), tables[i], slots[i], continues=True) for i, p in enumerate(prompts)
    ]
    return ForwardBatch(tuple(decode))


@pytest.mark.parametrize("triton_runner", ["llama", "gemma2"], indirect=True)
def test_decode_step_stays_within_the_op_budget_per_layer(triton_runner: ModelRunner) -> None:
    runner = triton_runner
    assert runner.lora_backend == "triton" and runner.attention_backend == "triton"
    batch = _decode_batch(runner)
    layers = runner.model.model.layers
    with OpCounter() as counter:
        for i, layer in enumerate(layers):
            _scoped(layer, counter, f"layer{i}")
        try:
            logits = runner.execute(batch)
        finally:
            for layer in layers:
                del layer.forward
    assert logits.shape[0] == 4 and torch.isfinite(logits).all()
    for i in range(len(layers)):
        counts = counter.scopes[f"layer{i}"]
        assert counts.num_ops <= BUDGET[runner.kind], dict(counts.ops)
        assert counts.num_triton_launches >= 9  # norms, RoPE + KV write, LoRA, attention, act x up
    assert counter.total.num_syncs == 0, dict(counter.total.syncs)


def _scoped(layer: torch.nn.Module, counter: OpCounter, name: str) -> None:
    forward = layer.forward

    def counted(*args, **kwargs):
        with counter.scope(name):
            return forward(*args, **kwargs)

    layer.forward = counted
