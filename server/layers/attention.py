"""Attention over the paged KV cache: Triton kernels on CUDA, a torch path on CPU.

New keys/values are written to their cache slots first. Then, per attention group:

- triton: `loraplex.kernels.paged_attention` reads K/V through the block tables (a decode
  kernel for one-token chunks, a varlen prefill kernel for the others).
- torch: each sequence's whole context (cached + new) is gathered from the cache into a padded
  batch and goes through torch SDPA, or an explicit softmax when Gemma2's logit softcapping is
  on (SDPA has no softcap). Correct everywhere, but it copies every context once per layer.

`LORAPLEX_ATTENTION=triton|torch` forces one (`auto`, the default: triton for CUDA tensors, torch
otherwise; a forced triton on CPU tensors runs the kernels in Triton's interpreter, for tests).
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
    """'triton' or 'torch' for tensors on `device`, honouring LORAPLEX_ATTENTION."""
    forced = os.environ.get(ATTENTION_ENV, "auto").strip().lower() or "auto"
    if forced not in _BACKENDS:
        raise ValueError(f"{ATTENTION_ENV}={forced!r}: expected one of {_BACKENDS}")
    if forced != "auto":
        return forced
    return "triton" if device.type == "cuda" else "torch"


def store_kv(
    key_cache: torch.Tensor, value_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write k, v [T, kv_heads, head_dim] to the flat slots of caches [blocks, block_size, kv_heads, head_dim]."""
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
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: ForwardMetadata,
    ) -> torch.Tensor:
        """q [T, heads, head_dim], k/v [T, kv_heads, head_dim] -> [T, heads * head_dim]."""
        store_kv(*kv_cache, k, v, meta.slot_mapping)
        if attention_backend(q.device) == "triton":
            return self._forward_triton(q, kv_cache, meta)
        if len(meta.attention_groups) == 1:
            return self._attend(q, kv_cache, meta.attention_groups[0])
        out = q.new_empty(q.shape[0], self.num_heads * self.head_dim)
        for group in meta.attention_groups:
            out[group.token_indices] = self._attend(q[group.token_indices], kv_cache, group)
        return out

    def _forward_triton(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], meta: ForwardMetadata
    ) -> torch.Tensor:
        from loraplex.kernels import paged_attention as kernels  # Triton is imported only where it runs

        spec = kernels.AttentionSpec(self.scale, self.softcap, self.sliding_window)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)  # [T, heads, D], contiguous
        single = len(meta.attention_groups) == 1  # q is then in the group's order: no gather, no scatter
        for group in meta.attention_groups:
            group_q = q if single else q[group.token_indices]
            group_out = out if single else None
            if group.max_query_len == 1:
                result = kernels.paged_decode_attention(
                    group_q, kv_cache, group.block_tables, group.context_lens, spec, out=group_out
                )
            else:
                result = kernels.paged_prefill_attention(
                    group_q, kv_cache, group.block_tables, group.context_lens,
                    group.query_starts, group.max_query_len, spec, out=group_out,
                )  # fmt: skip
            if not single:
                out[group.token_indices] = result
        return out.view(q.shape[0], -1)

    def _attend(
        self, q: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor], group: AttentionGroup
    ) -> torch.Tensor:
        """The group's queries q [n, heads, D] over their sequences' cached context -> [n, heads * D]."""
        key_cache, value_cache = kv_cache
        B, Q, kv_heads, D = group.num_seqs, group.max_query_len, self.num_kv_heads, self.head_dim
        heads_per_kv = self.num_heads // kv_heads
        # Every context position of every sequence: [B, kv_heads, S, D]
        keys = key_cache.view(-1, kv_heads, D)[group.context_slots].transpose(1, 2)
        values = value_cache.view(-1, kv_heads, D)[group.context_slots].transpose(1, 2)
        # Queries padded per sequence, the heads that share a KV head stacked along the query axis
        # ([B, kv_heads, heads_per_kv * Q, D]) so grouped-query attention never copies K/V per head.
        queries = q.new_zeros(B * Q, self.num_heads, D)
        queries[group.query_rows] = q
        queries = queries.view(B, Q, kv_heads, heads_per_kv, D).permute(0, 2, 3, 1, 4)
        queries = queries.reshape(B, kv_heads, heads_per_kv * Q, D)
        mask = group.masks[self.sliding_window]  # [B, 1, Q, S]
        mask = mask.unsqueeze(2).expand(-1, -1, heads_per_kv, -1, -1).reshape(B, 1, heads_per_kv * Q, -1)
        if self.softcap is None:
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=self.scale)
        else:
            out = _softcapped_attention(queries, keys, values, mask, self.scale, self.softcap)
        out = out.view(B, kv_heads, heads_per_kv, Q, D).permute(0, 3, 1, 2, 4).reshape(B * Q, -1)
        return out[group.query_rows]
