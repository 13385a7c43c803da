"""Attention over the paged KV cache: Triton kernels on CUDA, a torch path on CPU.

New keys/values are written to their cache slots first (by the caller's fused RoPE + KV write,
or here). Then, per attention group (all decodes, then all prefill chunks: each one range of
the step's tokens, so no gather or scatter of q or out):

- triton: `loraplex.kernels.paged_attention` reads K/V through the block tables (a decode
  kernel for one-token chunks, a varlen prefill kernel for the others).
- torch: decodes gather their contexts into one padded batch (one query each, so the padding
  is only along keys); each prefill chunk attends on its own to its sequence's context (SDPA
  over its new tokens, no padding across sequences). SDPA, or an explicit softmax when Gemma2's
  logit softcapping is on (SDPA has no softcap). Masks are built once per step per window.

The backend comes with the step's metadata (`ForwardMetadata.attention_backend`), chosen once
by the model runner with `attention_backend(device)`: `LORAPLEX_ATTENTION=triton|torch` forces
one (`auto`, the default: triton for CUDA, torch otherwise; a forced triton on CPU tensors runs
the kernels in Triton's interpreter, for tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.server.layers.metadata import AttentionGroup, ForwardMetadata

ATTENTION_ENV = "LORAPLEX_ATTENTION"
_BACKENDS = ("auto", "triton", "torch")


def attention_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, honouring LORAPLEX_ATTENTION (read when called)."""
    forced = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if forced not in _BACKENDS:
        raise ValueError(f"{ATTENTION_ENV}={forced!r}: expected one of {_BACKENDS}")
    if forced != "auto":
        return forced
    return "triton" if device.type == "cuda" else "torch"


def store_kv(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slots: torch.Tensor,
    padded: bool | None = None,
) -> None:
    """Write k, v [T, kv_heads, head_dim] to the flat slots of caches [blocks, block_size, kv_heads, head_dim].

    Negative slots (padding rows of a fixed-size batch, `padded`; None: look) write nothing.
    """
    if padded is None:
        padded = bool((slots < 0).any())
    if padded:  # the CPU path (the Triton one writes in rope_kv_write)
        keep = slots >= 0
        k, v, slots = k[keep], v[keep], slots[keep]
    key_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    value_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float
) -> torch.Tensor:
    """Same order of operations as transformers' eager Gemma2 attention: scale, softcap, mask, fp32 softmax."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


class PagedAttention(nn.Module):
    """Multi-head attention with grouped KV heads over a paged cache. No parameters."""

    def __init__(
        self,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} heads are not a multiple of {num_kv_heads} KV heads")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.softcap = softcap

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: ForwardMetadata,
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] (None: already in the cache) -> [T, heads * head_dim]."""
        if k is not None and v is not None:
            store_kv(*kv_cache, k, v, meta.slot_mapping, meta.padded)
        if meta.attention_backend == "triton":
            return self._forward_triton(q, kv_cache, meta)
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in meta.attention_groups:
            rows = group.token_slice
            if group.max_query_len == 1:
                out[rows] = self._attend_decodes(q[rows], kv_cache, group, meta.block_size)
            else:
                self._attend_prefills(q[rows], kv_cache, group, meta.block_size, out[rows])
        return out

    def _forward_triton(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: ForwardMetadata
    ) -> torch.Tensor:
        from loraplex.kernels import paged_attention as kernels  # Triton is imported only where it runs

        spec = kernels.AttentionSpec(self.scale, self.softcap, self.sliding_window)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, heads, D], contiguous
        for group in meta.attention_groups:
            rows = group.token_slice
            if group.max_query_len == 1:
                kernels.paged_decode_attention(
                    q[rows], kv_cache, group.block_tables, group.context_lens, spec, out=out[rows]
                )
            else:
                kernels.paged_prefill_attention(
                    q[rows], kv_cache, group.block_tables, group.context_lens,
                    group.query_starts, group.max_query_len, spec, out=out[rows],
                )  # fmt: skip
        return out.view(q.shape[0], -1)

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return _softcapped_attention(q, k, v, mask, self.scale, self.softcap)

    def _attend_decodes(
        self,
        q: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        group: AttentionGroup,
        block_size: int,
    ) -> torch.Tensor:
        """One query per sequence q [B, heads, D] over its gathered context -> [B, heads * D]."""
        key_cache, value_cache = kv_cache
        B, kv_heads, D = group.num_seqs, self.num_kv_heads, self.head_dim
        slots = group.context_slots(block_size)  # [B, S]
        keys = key_cache.view(-1, kv_heads, D)[slots].transpose(1, 2)  # [B, kv_heads, S, D]
        values = value_cache.view(-1, kv_heads, D)[slots].transpose(1, 2)
        # the heads that share a KV head stacked along the query axis: GQA never copies K/V per head
        queries = q.view(B, kv_heads, self.num_heads // kv_heads, D)
        out = self._attention(queries, keys, values, group.decode_mask(self.sliding_window))
        return out.reshape(B, -1)

    def _attend_prefills(
        self,
        q: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        group: AttentionGroup,
        block_size: int,
        out: torch.Tensor,
    ) -> None:
        """Each sequence's new queries over its own context, written into out [n, heads * D]."""
        key_cache, value_cache = kv_cache
        kv_heads, D = self.num_kv_heads, self.head_dim
        per_kv = self.num_heads // kv_heads
        all_slots = group.context_slots(block_size)
        starts = group.host_query_starts
        for i in range(group.num_seqs):
            first, last, ctx = int(starts[i]), int(starts[i + 1]), int(group.host_context_lens[i])
            n = last - first
            slots = all_slots[i, :ctx]
            keys = key_cache.view(-1, kv_heads, D)[slots].transpose(0, 1)  # [kv_heads, ctx, D]
            values = value_cache.view(-1, kv_heads, D)[slots].transpose(0, 1)
            queries = (
                q[first:last]
                .view(n, kv_heads, per_kv, D)
                .permute(1, 2, 0, 3)
                .reshape(kv_heads, per_kv * n, D)
            )
            mask = self._prefill_mask(group, i, n, ctx, per_kv)
            result = self._attention(queries, keys, values, mask)  # [kv_heads, per_kv * n, D]
            out[first:last] = result.view(kv_heads, per_kv, n, D).permute(2, 0, 1, 3).reshape(n, -1)

    def _prefill_mask(self, group: AttentionGroup, i: int, n: int, ctx: int, per_kv: int) -> torch.Tensor:
        """bool [per_kv * n, ctx]: causal (+ window) for queries at positions ctx - n .. ctx - 1 (once per step)."""
        key = ("prefill_mask", i, self.sliding_window, per_kv)
        mask = group._lazy.get(key)
        if mask is None:
            device = group.context_lens.device
            q_pos = torch.arange(ctx - n, ctx, device=device)[:, None]
            k_pos = torch.arange(ctx, device=device)[None, :]
            mask = k_pos <= q_pos
            if self.sliding_window is not None:
                mask &= k_pos > q_pos - self.sliding_window
            mask = mask.repeat(per_kv, 1)
            group._lazy[key] = mask
        return mask
