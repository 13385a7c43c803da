"""Decode steps padded to bucket sizes over static buffers, replayed from CUDA graphs.

A decode-only step of n sequences runs as the smallest bucket b >= n (1, 2, 4, 8, 16, 24,
32, ... up to max_num_seqs): the b - n idle rows read one cached slot, write no KV and use no
adapter. Every input is a view of `BatchBuffers`' persistent tensors, at the same address for
the same bucket, so on CUDA one graph per (bucket, with or without LoRA) is captured at
start-up (before the server reports ready; capture also compiles every Triton kernel) and
replayed: the step's host work is filling the staging arrays, two copies and `replay()`.

Everything except capture and replay also runs on the CPU (`capture=False`): the padded batch
through the same views, eagerly, which is how the tests check it against the eager path.
Prefill and mixed steps, and decode batches above the largest bucket, stay eager.

Built on `torch.cuda.CUDAGraph` with one shared memory pool (largest bucket captured first),
rather than `torch.compile(mode="reduce-overhead")`: see docs/design.md §10.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.server.batch_buffers import BatchBuffers, StepInputs
from loraplex.server.forward_batch import SequenceChunk

log = logging.getLogger(__name__)

_WARMUP_RUNS = 2  # eager runs before a capture: Triton compiles and picks its configs outside the graph
# Sequence ids of the capture batches; real ones count up from 0.
_CAPTURE_SEQ_ID = -1


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 8 up to max_num_seqs (which is always the last)."""
    small = [b for b in (1, 2, 4) if b < max_num_seqs]
    return (*small, *range(8, max_num_seqs, 8), max_num_seqs)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # static output [bucket, vocab]


Forward = Callable[[StepInputs], torch.Tensor]  # step inputs -> float32 logits of every token


class DecodeGraphs:
    """Runs decode-only steps at bucket sizes: replayed graphs on CUDA, the same static path eagerly on CPU."""

    def __init__(
        self,
        buffers: BatchBuffers,
        forward: Forward,
        buckets: Sequence[int],
        capture: bool,
    ) -> None:
        self.buffers = buffers
        self.forward = forward
        self.buckets = tuple(sorted(buckets))
        self.capture_enabled = capture
        self._graphs: dict[tuple[int, bool], _Graph] = {}

    def bucket_for(self, chunks: Sequence[SequenceChunk]) -> int | None:
        """The bucket of a decode-only step, None for anything else (it runs eagerly)."""
        n = len(chunks)
        if n > self.buckets[-1] or any(len(c.token_ids) != 1 for c in chunks):
            return None
        return next(b for b in self.buckets if b >= n)

    def run(
        self, chunks: Sequence[SequenceChunk], bucket: int, slot_ranks: torch.Tensor, host_ranks: np.ndarray
    ) -> torch.Tensor:
        """Float32 logits [len(chunks), vocab] in batch order."""
        inputs = self.buffers.build(chunks, slot_ranks, host_ranks, pad_to=bucket)
        return self.replay(inputs, bucket, len(chunks))

    def bucket_of(self, num_seqs: int) -> int | None:
        """The bucket of a decode-only step of `num_seqs` sequences (None: more than the largest)."""
        if num_seqs > self.buckets[-1]:
            return None
        return next(b for b in self.buckets if b >= num_seqs)

    def replay(self, inputs: StepInputs, bucket: int, num_chunks: int) -> torch.Tensor:
        """Logits [num_chunks, vocab] of inputs built at `bucket` size: its graph's replay (eager without one)."""
        graph = self._graphs.get((bucket, inputs.meta.lora is not None))
        if graph is None:
            logits = self.forward(inputs)
        else:
            graph.graph.replay()
            logits = graph.logits
        return logits[:num_chunks] if inputs.logits_in_order else logits[inputs.meta.logits_indices]

    def capture_all(self, slot_ranks: torch.Tensor, host_ranks: np.ndarray) -> None:
        """Capture every bucket with and without LoRA (CUDA); largest first, so smaller ones reuse its pool."""
        if not self.capture_enabled:
            return
        pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            for with_lora in (False, True):
                self._graphs[(bucket, with_lora)] = self._capture(
                    bucket, with_lora, slot_ranks, host_ranks, pool
                )
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs", extra={"buckets": list(self.buckets)})

    def _capture(
        self, bucket: int, with_lora: bool, slot_ranks: torch.Tensor, host_ranks: np.ndarray, pool
    ) -> _Graph:
        chunk = SequenceChunk(_CAPTURE_SEQ_ID, (0,), 0, (0,), 0 if with_lora else None)
        inputs = self.buffers.build([chunk], slot_ranks, host_ranks, pad_to=bucket, force_lora=with_lora)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(_WARMUP_RUNS):
                self.forward(inputs)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            logits = self.forward(inputs)
        return _Graph(graph, logits)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)
