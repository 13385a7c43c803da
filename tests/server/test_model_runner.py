"""ModelRunner against transformers and peft (float32, CPU): prefill, decode, mixed adapter batches."""

from __future__ import annotations

import random

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.adapters.peft_format import load_peft_adapter
from loraplex.server.demo_assets import TinyAssets
from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.model_runner import ModelRunner, RunnerConfig

ADAPTERS = ("a4", "b8", "c16")
BLOCK_SIZE = 4
ATOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """Tiny matmuls on a shared 2-core machine run many times faster without intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class Setup:
    """A runner with three adapters of `kind` in slots 0..2 and a reference model per slot (None = base)."""

    def __init__(self, assets: TinyAssets, kind: str) -> None:
        model_dir = assets.models[kind]
        self.runner = ModelRunner(
            RunnerConfig(
                model_path=str(model_dir), block_size=BLOCK_SIZE, num_kv_blocks=256, max_lora_rank=16
            )
        )
        self.references: dict[int | None, torch.nn.Module] = {None: self._base(model_dir)}
        for slot, (name, adapter_dir) in enumerate(list(assets.adapters[kind].items())[: len(ADAPTERS)]):
            self.runner.load_lora(slot, load_peft_adapter(adapter_dir, name, self.runner.hf_config, 16))
            self.references[slot] = PeftModel.from_pretrained(self._base(model_dir), adapter_dir).eval()
        self.free_blocks = list(range(self.runner.num_kv_blocks))
        random.Random(0).shuffle(self.free_blocks)  # non-contiguous block tables

    @staticmethod
    def _base(model_dir) -> torch.nn.Module:
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def block_table(self, num_tokens: int) -> tuple[int, ...]:
        count = -(-num_tokens // BLOCK_SIZE)
        assert count <= len(self.free_blocks), "test setup: raise num_kv_blocks"
        table, self.free_blocks = self.free_blocks[:count], self.free_blocks[count:]
        return tuple(table)

    @torch.no_grad()
    def reference_logits(self, slot: int | None, token_ids: list[int]) -> torch.Tensor:
        """Logits at every position of one full forward pass (teacher forcing)."""
        return self.references[slot](torch.tensor([token_ids])).logits[0].float()


@pytest.fixture(scope="module", params=["llama", "gemma2"])
def setup(request, tiny_assets: TinyAssets) -> Setup:
    return Setup(tiny_assets, request.param)


@pytest.fixture(scope="module", params=["llama", "gemma2", "trained"])
def fidelity(request, tiny_assets: TinyAssets) -> Setup:
    """`setup`'s kinds plus the demo's trained Llama with its sql, support and poem fine-tunes:
    trained weights have structure (large, correlated activations) that random ones lack."""
    if request.param == "trained":
        return Setup(request.getfixturevalue("trained_assets").as_tiny_assets("trained"), "trained")
    return Setup(tiny_assets, request.param)


def _tokens(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("slot", [None, 0, 1, 2])
def test_prefill_then_decode_matches_reference(fidelity: Setup, slot: int | None) -> None:
    runner = fidelity.runner
    ids = _tokens(22, runner.vocab_size, seed=1)  # longer than Gemma2's sliding window of 8
    expected = fidelity.reference_logits(slot, ids)
    table = fidelity.block_table(len(ids))
    logits = runner.execute(ForwardBatch((SequenceChunk(1, tuple(ids[:13]), 0, table, slot),)))
    torch.testing.assert_close(logits[0], expected[12], atol=ATOL, rtol=0)
    for pos in range(13, len(ids)):
        logits = runner.execute(ForwardBatch((SequenceChunk(1, (ids[pos],), pos, table, slot),)))
        torch.testing.assert_close(logits[0], expected[pos], atol=ATOL, rtol=0)


def test_adapters_change_the_output(fidelity: Setup) -> None:
    """Guards the test above against adapters that happen to do nothing."""
    ids = _tokens(9, fidelity.runner.vocab_size, seed=2)
    base = fidelity.reference_logits(None, ids)[-1]
    for slot in range(len(ADAPTERS)):
        assert (fidelity.reference_logits(slot, ids)[-1] - base).abs().max() > 0.1


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_mixed_batch_with_chunked_prefill(
    fidelity: Setup, kernels: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Base and three adapters in one batch, prompts of different lengths, one prefill split over two steps,
    decodes running next to prefills; every row matches its own reference. `triton` runs the Triton LoRA
    kernels in Triton's interpreter on these CPU tensors."""
    monkeypatch.setenv("LORAPLEX_KERNELS", kernels)
    runner = fidelity.runner
    slots = [None, 0, 1, 2]
    prompts = [_tokens(n, runner.vocab_size, seed=10 + n) for n in (5, 17, 11, 23)]
    total = [len(p) + 3 for p in prompts]
    sequences = [p + _tokens(3, runner.vocab_size, seed=20 + i) for i, p in enumerate(prompts)]
    expected = [fidelity.reference_logits(s, seq) for s, seq in zip(slots, sequences, strict=True)]
    tables = [fidelity.block_table(n) for n in total]
    done = [0, 0, 0, 0]  # tokens of each sequence already in the cache

    def step(plan: dict[int, int]) -> None:
        chunks = []
        for i, n in plan.items():
            ids = tuple(sequences[i][done[i] : done[i] + n])
            reaches_end = done[i] + n >= len(prompts[i])
            chunks.append(SequenceChunk(i, ids, done[i], tables[i], slots[i], needs_logits=reaches_end))
        logits = runner.execute(ForwardBatch(tuple(chunks)))
        assert logits.shape == (len(chunks), runner.vocab_size)
        assert logits.dtype == torch.float32
        for row, chunk in enumerate(chunks):
            done[chunk.seq_id] += chunk.num_tokens
            if chunk.needs_logits:
                want = expected[chunk.seq_id][done[chunk.seq_id] - 1]
                torch.testing.assert_close(logits[row], want, atol=ATOL, rtol=0)

    step({0: 5, 1: 9, 2: 6})  # 0 finishes its prompt; 1 and 2 are half way
    step({0: 1, 1: 8, 2: 5, 3: 23})  # 0 decodes while the others prefill
    for _ in range(2):
        step({0: 1, 1: 1, 2: 1, 3: 1})
    assert done == [8, 19, 13, 25]


def test_greedy_generation_matches_peft_generate(fidelity: Setup) -> None:
    runner = fidelity.runner
    new_tokens = 32
    prompts = [_tokens(n, runner.vocab_size, seed=30 + n) for n in (6, 9, 4, 12)]
    slots = [None, 0, 1, 2]
    tables = [fidelity.block_table(len(p) + new_tokens) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    chunks = [SequenceChunk(i, tuple(p), 0, tables[i], slots[i]) for i, p in enumerate(prompts)]
    for _ in range(new_tokens):
        next_ids = runner.execute(ForwardBatch(tuple(chunks))).argmax(dim=-1).tolist()
        for out, token in zip(outputs, next_ids, strict=True):
            out.append(token)
        chunks = [
            SequenceChunk(c.seq_id, (t,), c.context_len, c.block_table, c.lora_slot)
            for c, t in zip(chunks, next_ids, strict=True)
        ]
    for prompt, slot, ours in zip(prompts, slots, outputs, strict=True):
        with torch.no_grad():
            generated = fidelity.references[slot].generate(
                torch.tensor([prompt]),
                max_new_tokens=new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert generated[0, len(prompt) :].tolist() == ours


def test_reloading_a_slot_with_a_smaller_adapter(setup: Setup, tiny_assets: TinyAssets) -> None:
    """A rank-4 adapter in a slot that held rank 16 must not see the old weights beyond its rank."""
    runner = setup.runner
    kind = "gemma2" if runner.hf_config.model_type == "gemma2" else "llama"
    small = load_peft_adapter(tiny_assets.adapters[kind]["a4"], "a4", runner.hf_config, 16)
    big = load_peft_adapter(tiny_assets.adapters[kind]["c16"], "c16", runner.hf_config, 16)
    ids = _tokens(7, runner.vocab_size, seed=3)
    try:
        runner.load_lora(2, small)
        logits = runner.execute(ForwardBatch((SequenceChunk(9, tuple(ids), 0, setup.block_table(7), 2),)))
        torch.testing.assert_close(logits[0], setup.reference_logits(0, ids)[-1], atol=ATOL, rtol=0)
        runner.clear_lora(2)
        logits = runner.execute(ForwardBatch((SequenceChunk(9, tuple(ids), 0, setup.block_table(7), 2),)))
        torch.testing.assert_close(logits[0], setup.reference_logits(None, ids)[-1], atol=ATOL, rtol=0)
    finally:
        runner.load_lora(2, big)


def test_load_lora_rejects_what_does_not_fit(setup: Setup) -> None:
    runner = setup.runner
    hidden = runner.hf_config.hidden_size
    q_out = runner.hf_config.num_attention_heads * runner.hf_config.head_dim

    def weights(rank: int, a_in: int, module: str = "q_proj", layer: int = 0) -> LoraWeights:
        tensors = {(layer, module): (torch.ones(rank, a_in), torch.ones(q_out, rank))}
        return LoraWeights(name="bad", rank=rank, target_modules=(module,), tensors=tensors)

    before = [t.clone() for t in runner.model.lora_layers()[0].lora_a]
    with pytest.raises(ValueError, match="max_lora_rank"):
        runner.load_lora(0, weights(32, hidden))
    with pytest.raises(ValueError, match="does not fit"):
        runner.load_lora(0, weights(4, hidden + 1))
    with pytest.raises(ValueError, match="no projection"):
        runner.load_lora(0, weights(4, hidden, layer=runner.num_layers))
    with pytest.raises(ValueError, match="slot"):
        runner.load_lora(runner.max_loras, weights(4, hidden))
    for old, new in zip(before, runner.model.lora_layers()[0].lora_a, strict=True):
        assert torch.equal(old, new)  # a refused adapter leaves the slot as it was


def test_execute_rejects_bad_chunks(setup: Setup) -> None:
    runner = setup.runner
    with pytest.raises(ValueError, match="block table covers"):
        runner.execute(ForwardBatch((SequenceChunk(1, (5,) * 9, 0, (0, 1), None),)))
    with pytest.raises(ValueError, match="slot"):
        runner.execute(ForwardBatch((SequenceChunk(1, (5,), 0, (0,), runner.max_loras),)))
    with pytest.raises(ValueError, match="outside"):
        runner.execute(ForwardBatch((SequenceChunk(1, (5,), 0, (runner.num_kv_blocks,), None),)))
    with pytest.raises(ValueError, match="outside"):
        runner.execute(ForwardBatch((SequenceChunk(1, (5,), 0, (-1,), None),)))


def test_runner_config_defaults_on_cpu(tiny_assets: TinyAssets) -> None:
    runner = ModelRunner(
        RunnerConfig(model_path=str(tiny_assets.models["llama"]), max_loras=2, max_lora_rank=8)
    )
    assert runner.dtype == torch.float32
    assert runner.num_kv_blocks * runner.block_size >= 8192
    assert runner.slot_ranks.tolist() == [0, 0]
    with pytest.raises(ValueError, match="dtype"):
        ModelRunner(RunnerConfig(model_path=str(tiny_assets.models["llama"]), dtype="int8"))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stays_close_to_float32(tiny_assets: TinyAssets, dtype: str) -> None:
    model_dir, adapter_dir = tiny_assets.models["gemma2"], tiny_assets.adapters["gemma2"]["c16"]
    runner = ModelRunner(
        RunnerConfig(model_path=str(model_dir), dtype=dtype, num_kv_blocks=4, max_lora_rank=16)
    )
    runner.load_lora(1, load_peft_adapter(adapter_dir, "c16", runner.hf_config, 16))
    ids = _tokens(20, runner.vocab_size, seed=4)
    logits = runner.execute(ForwardBatch((SequenceChunk(0, tuple(ids), 0, (0, 1), 1),)))
    reference = PeftModel.from_pretrained(Setup._base(model_dir), adapter_dir)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1]
    assert runner.kv_cache.layers[0][0].dtype == getattr(torch, dtype)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], expected, atol=0.15, rtol=0)
