"""What the HTTP layer hands to the engine and what streams back (DESIGN.md §4, §5)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from loraplex.server.sampling_params import SamplingParams


class FinishReason(enum.StrEnum):
    LENGTH = "length"  # max_new_tokens or max total tokens reached
    EOS = "eos_token"  # the model produced an end-of-sequence token
    STOP = "stop_sequence"  # a stop string or stop token id matched
    CANCELLED = "cancelled"  # the client went away or the server is shutting down
    ERROR = "error"


@dataclass(frozen=True)
class GenerationRequest:
    """A tokenized request. `adapter` is a served adapter name, None for the base model."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    adapter: str | None = None
    # Another request (its id) with the same prompt and adapter, submitted just before this one
    # (`n`/`best_of` choices): this one is admitted once that one's prompt is in the KV cache, so
    # it reads the prompt's full blocks from the prefix cache instead of computing them again.
    shares_prompt_with: str | None = None


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class PromptTokenLogprob:
    """The model's log-probability of one prompt token given the tokens before it (vLLM's
    `prompt_logprobs` entry): `rank` 1 = the most likely token; `top` = the `prompt_logprobs`
    most likely tokens at that position, best first."""

    token_id: int
    logprob: float
    rank: int
    top: tuple[TokenLogprob, ...] = ()


@dataclass(slots=True)  # not frozen: one per request per step, and a frozen __init__ costs 3x; never mutated
class TokenEvent:
    """One generated token, or the final event of a request (finish_reason set).

    `text` is the detokenized increment to append to the output so far (may be "" while a
    multi-byte character is incomplete); the final event's `token_id` may be None when a
    request ends without a new token (cancelled, error).
    """

    request_id: str
    token_id: int | None
    text: str
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    error_type: str | None = None  # with `error`: "generation" (default), "shutdown", ...
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    # Once per request (`SamplingParams.prompt_logprobs` set), on its first event after the
    # prefill: one entry per prompt token, None for the first (nothing comes before it).
    prompt_logprobs: tuple[PromptTokenLogprob | None, ...] | None = None
