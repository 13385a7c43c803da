"""Sizing and allocation of the paged KV cache."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.kv_cache import KVCache, KVCacheSpec

SPEC = KVCacheSpec(num_layers=3, num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.bfloat16)


def test_bytes_per_block_counts_keys_and_values_of_every_layer() -> None:
    assert SPEC.bytes_per_block == 2 * 3 * 4 * 2 * 8 * 2
    assert SPEC.num_blocks_for(10 * SPEC.bytes_per_block + 1) == 10
    assert SPEC.num_blocks_for(-5) == 0


def test_allocates_zeroed_blocks_per_layer() -> None:
    cache = KVCache(SPEC, num_blocks=5, device=torch.device("cpu"))
    assert len(cache.layers) == 3
    for key, value in cache.layers:
        assert key.shape == value.shape == (5, 4, 2, 8)
        assert key.dtype == torch.bfloat16 and not key.any()
    assert cache.num_bytes == 5 * SPEC.bytes_per_block
    with pytest.raises(ValueError, match="at least one block"):
        KVCache(SPEC, num_blocks=0, device=torch.device("cpu"))
