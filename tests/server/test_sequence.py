"""Sequence bookkeeping."""

from __future__ import annotations

import pytest

from loraplex.server.sampling_params import SamplingParams
from loraplex.server.sequence import Sequence, SequenceStatus


def test_tokens_and_counts() -> None:
    seq = Sequence("r1", [5, 6, 7], SamplingParams())
    seq.num_cached_tokens = 3
    seq.append_token(8)
    assert seq.num_tokens == 4 and seq.num_prompt_tokens == 3
    assert seq.generated_token_ids == [8] and seq.prompt_token_ids == [5, 6, 7]
    assert seq.num_uncomputed_tokens == 1 and seq.last_token_id == 8


def test_reset_for_recompute_keeps_tokens() -> None:
    seq = Sequence("r1", [5, 6], SamplingParams())
    seq.status = SequenceStatus.RUNNING
    seq.num_cached_tokens, seq.block_table = 2, [3]
    seq.append_token(9)
    seq.reset_for_recompute()
    assert seq.token_ids == [5, 6, 9] and seq.num_cached_tokens == 0 and seq.block_table == []
    assert seq.status is SequenceStatus.WAITING and seq.num_preemptions == 1


def test_empty_prompt_refused() -> None:
    with pytest.raises(ValueError):
        Sequence("r", [], SamplingParams())


def test_ids_are_unique() -> None:
    a, b = Sequence("a", [1], SamplingParams()), Sequence("b", [1], SamplingParams())
    assert a.seq_id != b.seq_id
