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
    keys = [torch.randn(8, KV_HEADS, DIM, generator=gen) for _ in range(3)]
    values = [torch.randn(8, KV_HEADS, DIM, generator=gen) for _ in range(3)]
    # sequence 0: 5 tokens cached in blocks (6, 1), 3 new; 1: a fresh 2-token prefill in block 3;
    # 2: a decode, 4 tokens cached in block 0, the new one in block 2
    cached = {0: ([24, 25, 26, 27, 4], 5), 2: ([0, 1, 2, 3], 4)}
    for seq, (slots, n) in cached.items():
        cache[0].view(-1, KV_HEADS, DIM)[torch.tensor(slots)] = keys[seq][:n]
        cache[1].view(-1, KV_HEADS, DIM)[torch.tensor(slots)] = values[seq][:n]
    chunks = (
        SequenceChunk(0, (0,) * 3, 5, (6, 1), None),
        SequenceChunk(1, (0,) * 2, 0, (3,), None),
        SequenceChunk(2, (0,), 4, (0, 2), None),
    )
    meta = build_forward_metadata(ForwardBatch(chunks), BLOCK, {window}, torch.zeros(1), torch.device("cpu"))
    assert meta.logits_indices.tolist() == [3, 5, 0]  # the decode runs first, logits stay in batch order
    q = torch.randn(6, HEADS, DIM, generator=gen)  # run order: sequence 2, then 0, then 1
    k = torch.cat([keys[2][4:5], keys[0][5:8], keys[1][:2]])
    v = torch.cat([values[2][4:5], values[0][5:8], values[1][:2]])
    attention = PagedAttention(HEADS, KV_HEADS, DIM, scale=0.3, sliding_window=window, softcap=softcap)
    out = attention(q, k, v, cache, meta)
    assert out.shape == (6, HEADS * DIM)
    want = [
        _dense(q[:1], keys[2][:5], values[2][:5], torch.tensor([4]), 0.3, window, softcap),
        _dense(q[1:4], keys[0][:8], values[0][:8], torch.tensor([5, 6, 7]), 0.3, window, softcap),
        _dense(q[4:], keys[1][:2], values[1][:2], torch.tensor([0, 1]), 0.3, window, softcap),
    ]
    torch.testing.assert_close(out.double(), torch.cat(want), atol=1e-5, rtol=0)
    # the new keys landed in their slots: sequence 0 position 7 -> block 1 offset 3, and so on
    torch.testing.assert_close(cache[0][1, 3], keys[0][7])
    torch.testing.assert_close(cache[1][3, 1], values[1][1])
    torch.testing.assert_close(cache[0][2, 0], keys[2][4])


def test_rejects_heads_not_a_multiple_of_kv_heads() -> None:
    with pytest.raises(ValueError, match="multiple"):
        PagedAttention(6, 4, DIM, scale=1.0)
