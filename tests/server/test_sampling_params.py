"""SamplingParams bounds (issue 15): every value that passes can be sampled without an error."""

from __future__ import annotations

import pytest

from loraplex.server.sampling_params import GREEDY_TEMPERATURE, SamplingParams

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": NAN},
        {"temperature": INF},
        {"temperature": -1e-9},
        {"top_p": 0.0},
        {"top_p": 1.0000001},
        {"top_p": NAN},
        {"min_p": -0.1},
        {"min_p": 1.5},
        {"repetition_penalty": 0.0},
        {"repetition_penalty": -1.0},
        {"repetition_penalty": INF},
        {"repetition_penalty": NAN},
        {"repetition_penalty": 1e300},
        {"frequency_penalty": INF},
        {"presence_penalty": NAN},
        {"frequency_penalty": -1e300},
        {"seed": 1 << 64},
        {"seed": -(1 << 63) - 1},
        {"seed": 10**400},
        {"top_k": -1},
        {"top_k": 10**30},
        {"max_new_tokens": 0},
        {"max_new_tokens": 1 << 40},
        {"top_n_tokens": -1},
        {"stop_token_ids": (-1,)},
        {"stop_token_ids": (1 << 40,)},
        {"temperature": True},
    ],
)
def test_out_of_range_values_are_refused(params: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**params)


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 1e-45},
        {"temperature": 1e30},
        {"seed": (1 << 64) - 1},
        {"seed": -(1 << 63)},
        {"top_p": 1e-30},
        {"repetition_penalty": 1e-300},
        {"top_k": 1 << 31},
    ],
)
def test_values_at_the_limits_are_accepted(params: dict) -> None:
    SamplingParams(**params)


def test_a_temperature_below_the_floor_means_greedy() -> None:
    assert SamplingParams(temperature=1e-45).is_greedy
    assert SamplingParams(temperature=GREEDY_TEMPERATURE / 2).is_greedy
    assert not SamplingParams(temperature=GREEDY_TEMPERATURE).is_greedy
    assert SamplingParams(temperature=1.0, top_k=1).is_greedy
