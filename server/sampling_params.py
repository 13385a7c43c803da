"""Per-request sampling settings, validated once at the boundary and never mutated.

Bounds follow TGI and vLLM: every float is finite, a temperature below `GREEDY_TEMPERATURE`
means greedy (vLLM's `_SAMPLING_EPS`: dividing logits by a smaller one only overflows), seeds
fit what `torch.Generator.manual_seed` takes (int64 and uint64, as vLLM's and TGI's seeds do),
top-p is in (0, 1], min-p in [0, 1], the repetition penalty is positive. A request that breaks
one is a `ValueError` here, which the routes answer with 422, so nothing out of range ever
reaches the sampler inside the engine step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_TEMPERATURE = 1e-5  # below this, temperature sampling is greedy (vLLM's _SAMPLING_EPS)
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts
MAX_TOP_K = 1 << 31  # larger top_k means "off" anyway (clamped to the vocabulary)
MAX_PENALTY = 1e4  # repetition_penalty beyond this only overflows logits
MAX_ADDITIVE_PENALTY = 1e4  # |frequency_penalty|, |presence_penalty| (OpenAI's API stops at 2)
MAX_TOKEN_ID = (1 << 31) - 1


@dataclass(frozen=True)
class SamplingParams:
    """What one request asks of the sampler. `temperature < GREEDY_TEMPERATURE` means greedy."""

    max_new_tokens: int = 16
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off
    min_p: float = 0.0  # 0.0 = off (vLLM's min_p: drop tokens below min_p x the top probability)
    repetition_penalty: float = 1.0  # 1.0 = off (CTRL-style, as in transformers)
    frequency_penalty: float = 0.0  # OpenAI-style
    presence_penalty: float = 0.0  # OpenAI-style
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_n_tokens: int = 0  # alternatives returned per step (TGI `top_n_tokens`)
    # Log-probabilities of the prompt's tokens with this many alternatives per position (vLLM's
    # `prompt_logprobs`); None = not computed. Such a request reads nothing from the prefix cache.
    prompt_logprobs: int | None = None
    extra: dict[str, object] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        for check in _CHECKS:
            problem = check(self)
            if problem:
                raise ValueError(problem)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


def _finite(name: str, value: float) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return f"{name} must be a finite number, got {value!r}"
    return None


def _integer(name: str, value: object, low: int, high: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        return f"{name} must be an integer in [{low}, {high}], got {value!r}"
    return None


def _check_temperature(p: SamplingParams) -> str | None:
    return _finite("temperature", p.temperature) or (
        "temperature must be >= 0" if p.temperature < 0 else None
    )


def _check_top_p(p: SamplingParams) -> str | None:
    return _finite("top_p", p.top_p) or (None if 0 < p.top_p <= 1 else "top_p must be in (0, 1]")


def _check_min_p(p: SamplingParams) -> str | None:
    return _finite("min_p", p.min_p) or (None if 0 <= p.min_p <= 1 else "min_p must be in [0, 1]")


def _check_repetition_penalty(p: SamplingParams) -> str | None:
    value = p.repetition_penalty
    bad = not 0 < value <= MAX_PENALTY
    return _finite("repetition_penalty", value) or (
        f"repetition_penalty must be in (0, {MAX_PENALTY:g}]" if bad else None
    )


def _check_additive_penalties(p: SamplingParams) -> str | None:
    for name in ("frequency_penalty", "presence_penalty"):
        value = getattr(p, name)
        problem = _finite(name, value) or (
            f"{name} must be in [-{MAX_ADDITIVE_PENALTY:g}, {MAX_ADDITIVE_PENALTY:g}]"
            if abs(value) > MAX_ADDITIVE_PENALTY
            else None
        )
        if problem:
            return problem
    return None


def _check_integers(p: SamplingParams) -> str | None:
    return (
        _integer("max_new_tokens", p.max_new_tokens, 1, MAX_TOKEN_ID)
        or _integer("top_k", p.top_k, 0, MAX_TOP_K)
        or _integer("top_n_tokens", p.top_n_tokens, 0, 1 << 16)
        or (None if p.prompt_logprobs is None else _integer("prompt_logprobs", p.prompt_logprobs, 0, 1 << 16))
        or (None if p.seed is None else _integer("seed", p.seed, MIN_SEED, MAX_SEED))
        or next(
            (bad for t in p.stop_token_ids if (bad := _integer("stop_token_ids", t, 0, MAX_TOKEN_ID))), None
        )
    )


_CHECKS = (
    _check_integers,
    _check_temperature,
    _check_top_p,
    _check_min_p,
    _check_repetition_penalty,
    _check_additive_penalties,
)
