"""Sampler: per-row settings in one batch, penalties, filters, seeds, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from loraplex.server.sampler import RowFailure, SampledToken, Sampler, SamplingRow, _filter, _filter_batch
from loraplex.server.sampling_params import SamplingParams


def row(
    seq_id: int = 0, prompt: tuple[int, ...] = (), out: tuple[int, ...] = (), **params: object
) -> SamplingRow:
    return SamplingRow(seq_id, SamplingParams(**params), prompt, out)  # type: ignore[arg-type]


LOGITS = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5]])


def test_greedy_takes_argmax() -> None:
    assert Sampler()(LOGITS, [row()])[0].token_id == 1


def test_rows_use_their_own_params() -> None:
    logits = LOGITS.repeat(2, 1)
    out = Sampler()(logits, [row(0), row(1, prompt=(1,), repetition_penalty=10.0)])
    assert [t.token_id for t in out] == [1, 2]


def test_repetition_penalty_matches_transformers_rule() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.9]])
    # positive scores are divided, negative multiplied: token 0 (2.0 -> 1.0) loses to 2 (1.9)
    assert Sampler()(logits, [row(out=(0, 1), repetition_penalty=2.0)])[0].token_id == 2


def test_frequency_and_presence_penalties_count_generated_tokens_only() -> None:
    logits = torch.tensor([[3.0, 2.5, 0.0]])
    assert Sampler()(logits, [row(prompt=(0, 0, 0), frequency_penalty=1.0)])[0].token_id == 0
    assert Sampler()(logits, [row(out=(0,), frequency_penalty=1.0)])[0].token_id == 1
    assert Sampler()(logits, [row(out=(0, 0, 0), presence_penalty=0.4)])[0].token_id == 0  # once: 2.6
    assert Sampler()(logits, [row(out=(0, 0, 0), presence_penalty=0.6)])[0].token_id == 1
    assert Sampler()(logits, [row(out=(0,), frequency_penalty=0.2)])[0].token_id == 0
    assert Sampler()(logits, [row(out=(0, 0, 0), frequency_penalty=0.2)])[0].token_id == 1  # per count


def test_top_k_one_equals_greedy_even_with_temperature() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    greedy = [t.token_id for t in Sampler()(logits, [row(i) for i in range(4)])]
    sampled = [t.token_id for t in Sampler()(logits, [row(i, temperature=5.0, top_k=1) for i in range(4)])]
    assert sampled == greedy
    kept = _filter(logits[0] / 5.0, SamplingParams(temperature=5.0, top_k=1))
    assert torch.isfinite(kept).sum() == 1 and int(kept.argmax()) == greedy[0]


def test_top_p_keeps_the_nucleus() -> None:
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_filter(scores, SamplingParams(temperature=1.0, top_p=0.8)))
    assert kept.tolist() == [True, True, False, False]
    kept = torch.isfinite(_filter(scores, SamplingParams(temperature=1.0, top_p=0.1)))
    assert kept.tolist() == [True, False, False, False]


def test_top_k_filter() -> None:
    kept = torch.isfinite(_filter(torch.tensor([0.1, 0.9, 0.5, 0.7]), SamplingParams(top_k=2)))
    assert kept.tolist() == [False, True, False, True]


def draw(sampler: Sampler, seed: int | None, steps: int = 20, other_rows: int = 0) -> list[int]:
    """Sample `steps` tokens for request 0 from a flat distribution, with filler rows beside it."""
    torch.manual_seed(123)
    tokens = []
    for _ in range(steps):
        rows = [row(0, temperature=1.0, seed=seed)] + [row(9 + j, temperature=1.0) for j in range(other_rows)]
        tokens.append(sampler(torch.zeros(len(rows), 1000), rows)[0].token_id)
    return tokens


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch() -> None:
    first = draw(Sampler(), seed=7)
    assert draw(Sampler(), seed=7, other_rows=3) == first
    assert draw(Sampler(), seed=8) != first
    assert len(set(first)) > 5  # it really samples


def test_free_forgets_the_generator() -> None:
    sampler = Sampler()
    first = draw(sampler, seed=7, steps=3)
    sampler.free(0)
    assert draw(sampler, seed=7, steps=3) == first


def test_logprobs_and_top_alternatives() -> None:
    out = Sampler()(LOGITS, [row(logprobs=True, top_n_tokens=2)])[0]
    expected = torch.log_softmax(LOGITS[0], dim=-1)
    assert out.logprob == pytest.approx(float(expected[1]))
    assert [t.token_id for t in out.top_logprobs] == [1, 2]
    assert math.fsum(math.exp(t.logprob) for t in out.top_logprobs) < 1.0
    assert Sampler()(LOGITS, [row()])[0].logprob is None


def test_row_count_must_match() -> None:
    with pytest.raises(ValueError):
        Sampler()(LOGITS.repeat(2, 1), [row()])


# -- per-row failures and extreme values (issue 15) ------------------------------------------------


BATCH = torch.tensor([[1.0, 3.0, 2.0, -1.0, 0.5], [0.0, 0.1, 5.0, 0.2, 0.3], [4.0, 0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_logits_fail_only_their_row(bad: float) -> None:
    logits = BATCH.clone()
    logits[1, 3] = bad
    rows = [row(0), row(1, temperature=0.7, seed=3), row(2, repetition_penalty=1.3, logprobs=True)]
    out = Sampler()(logits, rows)
    assert isinstance(out[1], RowFailure) and "non-finite" in out[1].error
    quiet = Sampler()(BATCH[[0, 2]], [rows[0], rows[2]])
    assert [out[0], out[2]] == quiet


def test_a_row_without_any_finite_logit_fails() -> None:
    logits = BATCH.clone()
    logits[0] = float("-inf")
    out = Sampler()(logits, [row(0), row(1), row(2)])
    assert isinstance(out[0], RowFailure)
    assert [t.token_id for t in out[1:]] == [2, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_ids_of_greedy_rows_equal_the_call_step_after_step(dtype: torch.dtype) -> None:
    """The steady batch's greedy fast path (the same tuple of rows each call) gives the tokens of
    `__call__`, -1 for a row with NaN, +inf or nothing finite, in any call of the sequence."""
    rows = (row(0), row(1), row(2))
    sampler, reference = Sampler(), Sampler()
    variants = [BATCH.clone() for _ in range(5)]
    variants[1][1, 3] = float("nan")
    variants[2][2, 0] = float("inf")
    variants[3][0] = float("-inf")
    variants[4][0, 1] = variants[4][2, 4] = float("nan")
    for logits in [*variants, BATCH]:
        logits = logits.to(dtype)
        expected = [t.token_id if isinstance(t, SampledToken) else -1 for t in reference(logits, list(rows))]
        assert sampler.sample_ids(logits, rows) == expected


def test_sample_ids_fast_path_follows_the_rows() -> None:
    """A new tuple of rows (sampled, penalized, or after a failed plan) never reuses the greedy path."""
    logits = BATCH.clone()
    sampler = Sampler()
    greedy = (row(0), row(1), row(2))
    assert sampler.sample_ids(logits, greedy) == [1, 2, 0]
    assert sampler.sample_ids(logits, greedy) == [1, 2, 0]
    penalized = (row(0, out=(1,), repetition_penalty=100.0), row(1), row(2))
    assert sampler.sample_ids(logits, penalized) == [2, 2, 0]
    assert sampler.sample_ids(logits, penalized) == [2, 2, 0]  # the same tuple again: still penalized
    assert sampler.sample_ids(logits[:2], greedy[:2]) == [1, 2]
    with pytest.raises(ValueError):
        sampler.sample_ids(logits[:2], greedy)  # the shape is checked on the fast path too
    logprobs = (row(0, logprobs=True), row(1), row(2))
    with pytest.raises(ValueError, match="logprobs"):
        sampler.sample_ids(logits, logprobs)
    with pytest.raises(ValueError, match="logprobs"):
        sampler.sample_ids(logits, logprobs)
    sampler.sample_ids(logits, greedy)
    sampler.free(0)
    assert sampler.sample_ids(logits, greedy) == [1, 2, 0]


def test_minus_inf_logits_are_masked_tokens_not_failures() -> None:
    logits = BATCH.clone()
    logits[0, 1] = float("-inf")
    out = Sampler()(logits, [row(0, logprobs=True, top_n_tokens=5), row(1), row(2)])
    assert out[0].token_id == 2
    assert all(math.isfinite(t.logprob) for t in out[0].top_logprobs)  # -inf reported as -9999


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-45},
        {"temperature": 1e-5},
        {"temperature": 1e30},
        {"temperature": 0.01, "top_p": 1e-30},
        {"temperature": 0.5, "top_k": 1 << 31, "min_p": 1.0},
        {"temperature": 1.0, "repetition_penalty": 1e-300},
        {"temperature": 1.0, "repetition_penalty": 1e4, "frequency_penalty": -1e4, "presence_penalty": 1e4},
        {"temperature": 1.0, "seed": (1 << 64) - 1},
        {"temperature": 1.0, "seed": -(1 << 63)},
    ],
)
def test_params_at_their_limits_sample_a_valid_token(params: dict) -> None:
    logits = torch.tensor([[3e38, -3e38, 1.0, 0.0, 2.0], [1.0, 2.0, 3.0, 4.0, 5.0]])
    out = Sampler()(logits, [row(0, prompt=(0, 1), out=(2,), **params), row(1)])
    assert all(isinstance(t, SampledToken) for t in out)
    assert 0 <= out[0].token_id < 5 and out[1].token_id == 4


def test_temperature_below_the_floor_is_greedy() -> None:
    torch.manual_seed(0)
    logits = torch.randn(8, 100)
    greedy = [t.token_id for t in Sampler()(logits, [row(i) for i in range(8)])]
    tiny = [t.token_id for t in Sampler()(logits, [row(i, temperature=1e-6) for i in range(8)])]
    assert tiny == greedy


def test_min_p_drops_tokens_below_its_share_of_the_top() -> None:
    scores = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(_filter(scores, SamplingParams(temperature=1.0, min_p=0.5)))
    assert kept.tolist() == [True, True, False, False]


def test_batched_filters_equal_row_by_row() -> None:
    torch.manual_seed(1)
    scores = torch.randn(4, 64)
    params = [
        SamplingParams(temperature=1.0, top_k=5),
        SamplingParams(temperature=1.0, top_p=0.3),
        SamplingParams(temperature=1.0, top_k=10, top_p=0.5, min_p=0.1),
        SamplingParams(temperature=1.0),
    ]
    batched = _filter_batch(scores, params)
    for i, p in enumerate(params):
        assert torch.equal(batched[i], _filter(scores[i], p))
    assert torch.isfinite(batched[0]).sum() == 5 and torch.isfinite(batched[3]).all()


def test_sampled_rows_follow_the_distribution() -> None:
    """The exponential race samples the softmax: frequencies match probabilities."""
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.1]])).repeat(4000, 1)
    out = Sampler()(logits, [row(i, temperature=1.0) for i in range(4000)])
    counts = torch.bincount(torch.tensor([t.token_id for t in out]), minlength=3).float() / 4000
    assert torch.allclose(counts, torch.tensor([0.6, 0.3, 0.1]), atol=0.03)


def test_one_device_to_host_copy_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row's token, check, logprob and alternatives come back in one `.tolist()`; no
    `.item()`, `int(t)` or `float(t)` (each would be a blocking device sync of its own)."""
    copies: list[str] = []
    for name in ("tolist", "item", "__int__", "__float__", "__bool__", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _name=name, _original=original, **kwargs):
            copies.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    torch.manual_seed(0)
    rows = [
        row(0),
        row(1, temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, seed=11),
        row(
            2,
            prompt=(1, 2),
            out=(3,),
            repetition_penalty=1.2,
            frequency_penalty=0.5,
            logprobs=True,
            top_n_tokens=3,
        ),
        row(3, temperature=1.0),
    ]
    out = Sampler()(torch.randn(4, 64), rows)
    assert copies == ["tolist"]
    assert len(out[2].top_logprobs) == 3


def _penalized_argmax(logits: torch.Tensor, row: SamplingRow) -> int:
    """The greedy token after penalties, token by token in plain Python (the reference)."""
    p, scores = row.params, logits.tolist()
    for token in {*row.prompt_token_ids, *row.output_token_ids}:
        s = scores[token]
        scores[token] = s * p.repetition_penalty if s < 0 else s / p.repetition_penalty
    for token in set(row.output_token_ids):
        count = list(row.output_token_ids).count(token)
        scores[token] -= p.frequency_penalty * count + p.presence_penalty
    return max(range(len(scores)), key=scores.__getitem__)


def test_penalty_counts_kept_between_calls_equal_counts_from_all_tokens() -> None:
    """The engine passes each request's one row every step, its output a live list it appends
    to: the counts the sampler keeps (new tokens only) must equal counts made from every token."""
    torch.manual_seed(5)
    vocab, kept = 40, Sampler()
    settings = [
        {"repetition_penalty": 1.5},
        {"frequency_penalty": 0.7, "presence_penalty": 0.3},
        {},
        {"repetition_penalty": 0.8, "frequency_penalty": -0.4},
    ]
    outputs: list[list[int]] = [[] for _ in settings]
    rows = [SamplingRow(i, SamplingParams(**p), (i, i + 1, 7), outputs[i]) for i, p in enumerate(settings)]  # type: ignore[arg-type]
    for step in range(30):
        logits = torch.randn(len(rows), vocab) * 0.3
        if step == 15:  # a request leaves, a new one joins
            kept.free(rows[1].seq_id)
            outputs[1] = [3, 3, 9]
            rows[1] = SamplingRow(10, SamplingParams(frequency_penalty=2.0), (1,), outputs[1])
        got = [t.token_id for t in kept(logits, rows)]
        assert got == [_penalized_argmax(logits[i], r) for i, r in enumerate(rows)]
        for out, token in zip(outputs, got, strict=True):
            out.append(token)
    assert len(set(outputs[0])) > 3  # the penalties steer away from repeats: it really moves
