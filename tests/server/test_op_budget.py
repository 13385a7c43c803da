"""The GPU code path's launch budget, counted on the CPU: Triton kernels in the interpreter.

One decode step of a mixed batch (base and three adapters) through the tiny models with every
backend on Triton and the launch configs of an H100 (132 SMs: split-K LoRA shrinks, split
decode attention): each decoder layer launches at most 20 device ops (Llama) or 24 (Gemma-2),
and the model runner's step never makes the host wait for the device.
"""

from __future__ import annotations

import pytest
import torch

from loraplex.kernels import triton_common
from loraplex.kernels.op_count import OpCounter
from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_runner import ModelRunner, RunnerConfig

BUDGET = {"llama": 20, "gemma2": 24}
BLOCK = 16
CONTEXT = 300  # long enough for the decode attention to split (and merge) as on an H100
H100_SMS = 132


@pytest.fixture
def triton_runner(request, tiny_assets, monkeypatch: pytest.MonkeyPatch) -> ModelRunner:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("LORAPLEX_KERNELS", "triton")
    monkeypatch.setenv("LORAPLEX_ATTENTION", "triton")
    monkeypatch.setattr(triton_common, "num_sms", lambda device: H100_SMS)
    kind = request.param
    runner = ModelRunner(
        RunnerConfig(
            model_path=str(tiny_assets.models[kind]), block_size=BLOCK, num_kv_blocks=128, max_lora_rank=16,
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


def _decode_batch() -> ForwardBatch:
    """One new token for each of four sequences (base, a4, b8, c16) about CONTEXT tokens long.

    Their cached K/V are the cache's zeros (counting needs no real prefill, which the
    interpreter would take minutes over); the attention still reads every position.
    """
    blocks = -(-CONTEXT // BLOCK)
    slots = (None, 0, 1, 2)
    return ForwardBatch(
        tuple(
            SequenceChunk(i, (3 + i,), CONTEXT - 1 - i, tuple(range(i * blocks, (i + 1) * blocks)), slot)
            for i, slot in enumerate(slots)
        )
    )


@pytest.mark.parametrize("triton_runner", ["llama", "gemma2"], indirect=True)
def test_decode_step_stays_within_the_op_budget_per_layer(triton_runner: ModelRunner) -> None:
    runner = triton_runner
    assert runner.lora_backend == "triton" and runner.attention_backend == "triton"
    batch = _decode_batch()
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
    merges = [counter.scopes[f"layer{i}"].ops["triton:_decode_merge_kernel"] for i in range(len(layers))]
    assert max(merges) == 1  # full-attention layers split the context as on an H100 (and merge)
    assert counter.total.num_syncs == 0, dict(counter.total.syncs)


def _scoped(layer: torch.nn.Module, counter: OpCounter, name: str) -> None:
    forward = layer.forward

    def counted(*args, **kwargs):
        with counter.scope(name):
            return forward(*args, **kwargs)

    layer.forward = counted
