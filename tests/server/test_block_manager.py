"""Block manager: allocation, growth, reference counts and the adapter-keyed prefix cache."""

from __future__ import annotations

import pytest

from loraplex.server.block_manager import BlockManager
from loraplex.server.sampling_params import SamplingParams
from loraplex.server.sequence import AdapterRef, Sequence


def make_seq(tokens: list[int], adapter: AdapterRef | None = None) -> Sequence:
    return Sequence("r", tokens, SamplingParams(), adapter)


def run_prefill(bm: BlockManager, seq: Sequence) -> None:
    """Allocate and 'compute' the whole sequence, as a step would."""
    bm.allocate(seq, seq.num_tokens - bm.num_cached_prefix_tokens(seq))
    seq.num_cached_tokens = seq.num_tokens
    bm.commit(seq)


def test_allocate_covers_tokens_and_deallocate_returns_blocks() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.can_allocate(seq, 10)
    bm.allocate(seq, 10)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    assert len(set(seq.block_table)) == 3
    bm.deallocate(seq)
    assert bm.num_free_blocks == 8 and seq.block_table == []


def test_can_allocate_refuses_when_short_of_blocks() -> None:
    bm = BlockManager(num_blocks=2, block_size=4)
    assert not bm.can_allocate(make_seq(list(range(9))), 9)
    assert bm.can_allocate(make_seq(list(range(8))), 8)


def test_append_grows_only_at_block_boundaries() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq([1, 2, 3, 4])
    bm.allocate(seq, 4)
    seq.num_cached_tokens = 4
    seq.append_token(5)
    assert bm.can_append(seq, 1)
    bm.may_append(seq, 1)
    assert len(seq.block_table) == 2
    seq.num_cached_tokens = 5
    seq.append_token(6)
    bm.may_append(seq, 1)
    assert len(seq.block_table) == 2


def test_prefix_hit_for_same_adapter_version_only() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    prompt = list(range(13))
    a1 = AdapterRef("a", 1)
    first = make_seq(prompt, a1)
    run_prefill(bm, first)
    assert bm.num_cached_prefix_tokens(make_seq(prompt, a1)) == 12
    assert bm.num_cached_prefix_tokens(make_seq(prompt, AdapterRef("b", 2))) == 0
    assert bm.num_cached_prefix_tokens(make_seq(prompt, AdapterRef("a", 3))) == 0
    assert bm.num_cached_prefix_tokens(make_seq(prompt, None)) == 0
    second = make_seq(prompt, a1)
    bm.allocate(second, 1)
    assert second.num_cached_tokens == 12 and second.block_table[:3] == first.block_table[:3]
    assert bm.blocks[first.block_table[0]].ref_count == 2


def test_last_token_is_never_served_from_cache() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    run_prefill(bm, make_seq(list(range(8))))
    assert bm.num_cached_prefix_tokens(make_seq(list(range(8)))) == 4


def test_freed_blocks_stay_cached_until_reused() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq(list(range(9)))
    run_prefill(bm, seq)
    bm.deallocate(seq)
    assert bm.num_free_blocks == 4
    again = make_seq(list(range(9)))
    assert bm.can_allocate(again, 1)
    bm.allocate(again, 1)
    assert again.num_cached_tokens == 8 and bm.num_free_blocks == 1
    bm.deallocate(again)
    # Filling the cache with other tokens evicts the old prefix.
    run_prefill(bm, make_seq(list(range(100, 116))))
    assert bm.num_cached_prefix_tokens(make_seq(list(range(9)))) == 0


def test_divergent_suffix_shares_only_common_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    run_prefill(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert bm.num_cached_prefix_tokens(make_seq([1, 2, 3, 4, 5, 6, 0, 8, 9])) == 4


def test_prefix_caching_can_be_disabled() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    run_prefill(bm, make_seq(list(range(9))))
    assert bm.num_cached_prefix_tokens(make_seq(list(range(9)))) == 0


def test_may_append_without_space_raises() -> None:
    bm = BlockManager(num_blocks=1, block_size=2)
    seq = make_seq([1, 2])
    bm.allocate(seq, 2)
    seq.num_cached_tokens = 2
    assert not bm.can_append(seq, 1)
    with pytest.raises(RuntimeError):
        bm.may_append(seq, 1)
