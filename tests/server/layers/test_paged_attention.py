"""PagedAttention against a dense float64 attention written out per sequence."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.forward_batch import ForwardBatch, SequenceChunk
from loraplex.server.layers.attention import PagedAttention
from loraplex.server.layers.metadata import build_forward_metadata

HEADS, KV_HEADS, DIM, BLOCK = 4, 2, 8, 4


def _dense(q, k, v, positions, scale, window, softcap):
    """q [n, H, D] at `positions`, k/v [ctx, Hkv, D] for positions 0..ctx-1."""
    q, k, v = q.double(), k.double().repeat_interleave(2, 1), v.double().repeat_interleave(2, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    key_pos = torch.arange(k.shape[0])
    allowed = key_pos[None, :] <= positions[:, None]
    if window is not None:
        allowed &= key_pos[None, :] > positions[:, None] - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (3, None), (None, 5.0), (3, 5.0)])
def test_matches_dense_attention_over_cached_and_new_tokens(window, softcap) -> None:
    gen = torch.Generator().manual_seed(0)
    cache = (torch.zeros(8, BLOCK, KV_HEADS, DIM), torch.zeros(8, BLOCK, KV_HEADS, DIM))
    # sequence 0: 5 tokens already cached in blocks (6, 1), 3 new; sequence 1: a fresh 2-token prefill
    keys = [torch.randn(8, KV_HEADS, DIM, generator=gen) for _ in range(2)]
    values = [torch.randn(8, KV_HEADS, DIM, generator=gen) for _ in range(2)]
    cache[0].view(-1, KV_HEADS, DIM)[torch.tensor([24, 25, 26, 27, 4])] = keys[0][:5]
    cache[1].view(-1, KV_HEADS, DIM)[torch.tensor([24, 25, 26, 27, 4])] = values[0][:5]
    chunks = (SequenceChunk(0, (0,) * 3, 5, (6, 1), None), SequenceChunk(1, (0,) * 2, 0, (3,), None))
    meta = build_forward_metadata(ForwardBatch(chunks), BLOCK, {window}, torch.zeros(1), torch.device("cpu"))
    q = torch.randn(5, HEADS, DIM, generator=gen)
    k = torch.cat([keys[0][5:8], keys[1][:2]])
    v = torch.cat([values[0][5:8], values[1][:2]])
    attention = PagedAttention(HEADS, KV_HEADS, DIM, scale=0.3, sliding_window=window, softcap=softcap)
    out = attention(q, k, v, cache, meta)
    assert out.shape == (5, HEADS * DIM)
    want0 = _dense(q[:3], keys[0][:8], values[0][:8], torch.tensor([5, 6, 7]), 0.3, window, softcap)
    want1 = _dense(q[3:], keys[1][:2], values[1][:2], torch.tensor([0, 1]), 0.3, window, softcap)
    torch.testing.assert_close(out.double(), torch.cat([want0, want1]), atol=1e-5, rtol=0)
    # the new keys landed in their slots: sequence 0 position 7 -> block 1 offset 3
    torch.testing.assert_close(cache[0][1, 3], keys[0][7])
    torch.testing.assert_close(cache[1][3, 1], values[1][1])


def test_rejects_heads_not_a_multiple_of_kv_heads() -> None:
    with pytest.raises(ValueError, match="multiple"):
        PagedAttention(6, 4, DIM, scale=1.0)
