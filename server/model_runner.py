"""Runs one `ForwardBatch` through the model: paged KV cache, LoRA slots, logits of each chunk's last token."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.kernels.lora import kernel_backend
from loraplex.server.adapters.lora_weights import LoraWeights
from loraplex.server.batch_buffers import BatchBuffers, StepInputs
from loraplex.server.cuda_graphs import DecodeGraphs, decode_buckets
from loraplex.server.forward_batch import DecodeStep, ForwardBatch, SequenceChunk
from loraplex.server.kv_cache import KVCache, KVCacheSpec
from loraplex.server.layers.attention import attention_backend
from loraplex.server.model_loader import load_config, load_model, resolve_model_path
from loraplex.server.models import lora_module_shapes
from loraplex.server.models.llama import head_dim_of
from loraplex.server.prompt_logprobs import PromptScoring
from loraplex.server.prompt_scoring import score_prompt
from loraplex.server.request import PromptTokenLogprob

DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}
# The CPU cache is sized by tokens (tests, demo), capped in bytes so big models stay within RAM.
_CPU_CACHE_TOKENS = 8192
_CPU_CACHE_MAX_BYTES = 1 << 30
_WARM_UP_SEQ_ID = -2  # the start-up prefill's sequence (real ones count up from 0)
# Room left on the GPU for activations and the allocator's own slack.
_CUDA_ACTIVATION_RESERVE = 1 << 30


@dataclass(frozen=True)
class RunnerConfig:
    model_path: str  # local HF checkpoint dir (config.json + *.safetensors, sharded ok) or hub id
    dtype: str = "auto"  # auto|bfloat16|float16|float32 (auto: checkpoint dtype on GPU, float32 on CPU)
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: from kv_cache_memory_fraction on CUDA, a modest default on CPU
    kv_cache_memory_fraction: float = 0.9
    max_loras: int = 4  # slots
    max_lora_rank: int = 64
    revision: str | None = None  # hub revision when model_path is a hub id
    max_num_seqs: int = 64  # sequences in one step (sizes the persistent batch buffers)
    max_batch_tokens: int = 2048  # tokens in one step
    max_model_len: int = 4096  # positions of one sequence (prompt + generated)
    cuda_graphs: bool = True  # decode steps replay CUDA graphs (CUDA only; False: always eager)
    # Decode steps padded to graph buckets over static buffers. None: exactly when CUDA graphs
    # run; True on the CPU runs that path eagerly (tests compare it with the eager path).
    static_decode: bool | None = None


def resolve_dtype(name: str, hf_config, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in DTYPES:
            raise ValueError(f"dtype {name!r} is not one of auto, {', '.join(DTYPES)}")
        return DTYPES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.bfloat16


class ModelRunner:
    """Owns the weights, the KV cache and the LoRA slot buffers of one model on one device."""

    def __init__(self, config: RunnerConfig) -> None:
        if config.max_loras < 1 or config.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be at least 1")
        self.config = config
        self.device = torch.device(config.device)
        self.model_path = resolve_model_path(config.model_path, config.revision)
        self.hf_config = load_config(self.model_path)
        self.dtype = resolve_dtype(config.dtype, self.hf_config, self.device)
        self.model = load_model(self.model_path, self.hf_config, self.dtype, self.device)
        self.vocab_size: int = self.hf_config.vocab_size
        self.block_size = config.block_size
        self.max_loras = config.max_loras
        self.max_lora_rank = config.max_lora_rank
        self.num_layers: int = self.hf_config.num_hidden_layers
        self._lora_shapes = lora_module_shapes(self.hf_config)
        self._attention_windows = self.model.attention_windows
        self.lora_backend = kernel_backend(self.device)  # chosen once; the slot layout follows it
        num_slices = 0
        for layer in self.model.lora_layers():
            layer.create_lora_slots(self.max_loras, self.max_lora_rank, self.lora_backend)
            layer.workspace_offset, num_slices = num_slices, num_slices + len(layer.out_features)
        self.slot_ranks = torch.zeros(self.max_loras, dtype=torch.int32, device=self.device)
        self._host_ranks = np.zeros(self.max_loras, dtype=np.int64)
        spec = KVCacheSpec(
            num_layers=self.num_layers,
            num_kv_heads=self.hf_config.num_key_value_heads,
            head_dim=head_dim_of(self.hf_config),
            block_size=self.block_size,
            dtype=self.dtype,
        )
        self.num_kv_blocks = config.num_kv_blocks or self._default_num_blocks(spec)
        self.kv_cache = KVCache(spec, self.num_kv_blocks, self.device)
        # Chosen once here and passed down with every step's metadata (no environment reads per call).
        self.attention_backend = attention_backend(self.device)
        self.buffers = BatchBuffers(
            max_seqs=config.max_num_seqs,
            max_tokens=max(config.max_batch_tokens, config.max_num_seqs),
            max_blocks_per_seq=min(self.num_kv_blocks, -(-config.max_model_len // self.block_size)),
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            num_slots=self.max_loras,
            device=self.device,
            attention_backend=self.attention_backend,
            lora_backend=self.lora_backend,
            lora_workspace_per_token=num_slices * self.max_lora_rank,
        )
        if self.device.type == "cuda":
            self._warm_up_prefill()
        self.graphs = self._decode_graphs(config)

    def _decode_graphs(self, config: RunnerConfig) -> DecodeGraphs | None:
        """Capture the decode graphs now (CUDA), before the engine serves anything; None: all eager."""
        on_cuda = self.device.type == "cuda"
        static = config.static_decode if config.static_decode is not None else config.cuda_graphs and on_cuda
        if not static:
            return None
        capture = config.cuda_graphs and on_cuda
        graphs = DecodeGraphs(self.buffers, self._forward_all, decode_buckets(config.max_num_seqs), capture)
        with torch.inference_mode():
            graphs.capture_all(self.slot_ranks, self._host_ranks)
        return graphs

    @torch.inference_mode()
    def _warm_up_prefill(self) -> None:
        """Run a short prefill with and without LoRA so no request waits on a Triton compile (CUDA).

        It writes K/V into block 0, which no sequence holds yet.
        """
        length = min(self.block_size, self.buffers.max_tokens)
        chunk = SequenceChunk(_WARM_UP_SEQ_ID, (0,) * length, 0, (0,), None)
        for force_lora in (False, True):
            inputs = self.buffers.build([chunk], self.slot_ranks, self._host_ranks, force_lora=force_lora)
            self._forward_all(inputs)
        torch.cuda.synchronize(self.device)

    def _forward_all(self, inputs: StepInputs) -> torch.Tensor:
        """Float32 logits of every token of the step (the decode graphs' body)."""
        meta = inputs.meta
        hidden = self.model(inputs.input_ids, meta.positions, self.kv_cache.layers, meta)
        return self.model.compute_logits(hidden)

    def _default_num_blocks(self, spec: KVCacheSpec) -> int:
        if self.device.type != "cuda":
            by_tokens = math.ceil(_CPU_CACHE_TOKENS / spec.block_size)
            return max(1, min(by_tokens, spec.num_blocks_for(_CPU_CACHE_MAX_BYTES)))
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * self.config.kv_cache_memory_fraction) - (total - free) - _CUDA_ACTIVATION_RESERVE
        num_blocks = spec.num_blocks_for(budget)
        if num_blocks < 1:
            raise RuntimeError(
                f"no GPU memory left for the KV cache ({free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB)"
            )
        return num_blocks

    def execute(self, batch: ForwardBatch) -> torch.Tensor:
        """Float32 logits [len(batch.chunks), vocab] of each chunk's last token (see ForwardBatch)."""
        with torch.inference_mode():  # a context, not the decorator: one object less per step
            return self._execute(batch)

    def _execute(self, batch: ForwardBatch) -> torch.Tensor:
        self._check_batch(batch)
        bucket = self.graphs.bucket_for(batch.chunks) if self.graphs is not None else None
        if bucket is not None:
            return self.graphs.run(batch.chunks, bucket, self.slot_ranks, self._host_ranks)
        inputs = self.buffers.build(batch.chunks, self.slot_ranks, self._host_ranks)
        meta = inputs.meta
        hidden = self.model(inputs.input_ids, meta.positions, self.kv_cache.layers, meta)
        return self.model.compute_logits(hidden if inputs.logits_in_order else hidden[meta.logits_indices])

    def execute_decode(self, step: DecodeStep) -> torch.Tensor:
        """`execute` for a steady batch's decode step (see `DecodeStep`): logits [rows, vocab], in row order.

        The rows' LoRA slots are checked whenever the step is built from its chunks; they do not
        change while the batch stays the same.
        """
        if torch.is_inference_mode_enabled():  # AsyncEngine's thread runs in inference mode throughout
            return self._execute_decode(step)
        with torch.inference_mode():
            return self._execute_decode(step)

    def _execute_decode(self, step: DecodeStep) -> torch.Tensor:
        graphs = self.graphs
        if graphs is not None and (bucket := graphs.bucket_of(step.num_seqs)) is not None:
            inputs = self.buffers.build_decode(
                step, self.slot_ranks, self._host_ranks, bucket, self._check_batch
            )
            return graphs.replay(inputs, bucket, step.num_seqs)
        inputs = self.buffers.build_decode(step, self.slot_ranks, self._host_ranks, 0, self._check_batch)
        meta = inputs.meta
        # `forward` itself: the top-level module has no hooks, and `Module.__call__` costs ~10 us here.
        hidden = self.model.forward(inputs.input_ids, meta.positions, self.kv_cache.layers, meta)
        return self.model.compute_logits(hidden if inputs.logits_in_order else hidden[meta.logits_indices])

    @torch.inference_mode()
    def execute_scoring(
        self, batch: ForwardBatch, scoring: list[PromptScoring]
    ) -> tuple[torch.Tensor, list[list[PromptTokenLogprob]]]:
        """`execute`, plus the prompt log-probabilities `scoring` asks of some chunks (always eager).

        Each chunk's rows went through its own adapter in the forward pass; only the asking
        chunks' rows become logits (float32, see `score_prompt`).
        """
        self._check_batch(batch)
        inputs = self.buffers.build(batch.chunks, self.slot_ranks, self._host_ranks)
        meta = inputs.meta
        hidden = self.model(inputs.input_ids, meta.positions, self.kv_cache.layers, meta)
        logits = self.model.compute_logits(hidden[meta.logits_indices])
        starts = _chunk_starts(batch.chunks, inputs.order)
        return logits, [
            score_prompt(self.model.compute_logits, hidden[starts[s.chunk_index] :], s) for s in scoring
        ]

    def load_lora(self, slot: int, weights: LoraWeights) -> None:
        """Copy an adapter into a slot (zero-padding ranks); ValueError, slot untouched, if it does not fit."""
        self._check_slot(slot)
        self._check_fits(weights)
        self.clear_lora(slot)
        for (layer_index, module), (a, b) in weights.tensors.items():
            layer, shard = self.model.lora_target(layer_index, module)
            layer.set_lora(slot, shard, a.to(self.device, self.dtype), b.to(self.device, self.dtype))
        self.slot_ranks[slot] = weights.rank
        self._host_ranks[slot] = weights.rank
        self.buffers.ranks_changed()

    def clear_lora(self, slot: int) -> None:
        self._check_slot(slot)
        for layer in self.model.lora_layers():
            layer.clear_lora(slot)
        self.slot_ranks[slot] = 0
        self._host_ranks[slot] = 0
        self.buffers.ranks_changed()

    def _check_batch(self, batch: ForwardBatch) -> None:
        """LoRA slots here; block tables as the buffers copy their new entries (O(changed) per step)."""
        for chunk in batch.chunks:
            if chunk.lora_slot is not None and not 0 <= chunk.lora_slot < self.max_loras:
                raise ValueError(f"sequence {chunk.seq_id}: LoRA slot {chunk.lora_slot} out of range")

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} out of range 0..{self.max_loras - 1}")

    def _check_fits(self, weights: LoraWeights) -> None:
        if weights.rank > self.max_lora_rank:
            raise ValueError(
                f"adapter {weights.name}: rank {weights.rank} > max_lora_rank {self.max_lora_rank}"
            )
        for (layer_index, module), (a, b) in weights.tensors.items():
            if module not in self._lora_shapes or not 0 <= layer_index < self.num_layers:
                raise ValueError(f"adapter {weights.name}: no projection {module} in layer {layer_index}")
            in_features, out_features = self._lora_shapes[module]
            rank = a.shape[0]
            if (
                tuple(a.shape) != (rank, in_features)
                or tuple(b.shape) != (out_features, rank)
                or rank > weights.rank
            ):
                raise ValueError(
                    f"adapter {weights.name}: layer {layer_index} {module} A {tuple(a.shape)} B {tuple(b.shape)} "
                    f"does not fit in={in_features} out={out_features} rank<={weights.rank}"
                )


def _chunk_starts(chunks: tuple[SequenceChunk, ...], order: tuple[int, ...]) -> list[int]:
    """The row of each chunk's first token among the step's tokens, in batch order (they run in `order`)."""
    starts = [0] * len(chunks)
    row = 0
    for index in order:
        starts[index] = row
        row += chunks[index].num_tokens
    return starts
