"""Next-token choice for a batch where every row has its own `SamplingParams`.

Penalties first (repetition as in `transformers`, frequency/presence as in OpenAI), then
greedy rows take the argmax and the others temperature, top-k, top-p and a draw. A request
with a seed owns a `torch.Generator`, so its draws do not depend on what else is batched
with it. Reported logprobs are those of the model's own distribution (before penalties and
temperature), like vLLM's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.server.request import TokenLogprob
from loraplex.server.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """One logits row's request: its settings and the tokens so far (for penalties)."""

    seq_id: int
    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def free(self, seq_id: int) -> None:
        """Forget a finished sequence's generator."""
        self._generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken]:
        """`logits`: float32 `[len(rows), vocab]`, one row per request that needs a token."""
        if logits.shape[0] != len(rows):
            raise ValueError(f"{logits.shape[0]} logits rows for {len(rows)} requests")
        logits = logits.float()
        logprobs = torch.log_softmax(logits, dim=-1) if any(_wants_logprobs(r) for r in rows) else None
        scores = logits.clone()
        for i, row in enumerate(rows):
            _apply_penalties(scores[i], row)
        token_ids = self._choose(scores, rows)
        return [_report(token_ids[i], logprobs, i, row) for i, row in enumerate(rows)]

    def _choose(self, scores: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
        chosen = scores.argmax(dim=-1).tolist()
        for i, row in enumerate(rows):
            if not row.params.is_greedy:
                probs = torch.softmax(_filter(scores[i] / row.params.temperature, row.params), dim=-1)
                chosen[i] = int(torch.multinomial(probs, 1, generator=self._generator(row, probs.device)))
        return chosen

    def _generator(self, row: SamplingRow, device: torch.device) -> torch.Generator | None:
        if row.params.seed is None:
            return None
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(row.params.seed)
            self._generators[row.seq_id] = generator
        return generator


def _wants_logprobs(row: SamplingRow) -> bool:
    return row.params.logprobs or row.params.top_n_tokens > 0


def _apply_penalties(scores: torch.Tensor, row: SamplingRow) -> None:
    """In place on one row of scores `[vocab]`."""
    p = row.params
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(
            sorted({*row.prompt_token_ids, *row.output_token_ids}), dtype=torch.long, device=scores.device
        )
        picked = scores[seen]
        scores[seen] = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
    if (p.frequency_penalty or p.presence_penalty) and row.output_token_ids:
        out = torch.tensor(list(row.output_token_ids), dtype=torch.long, device=scores.device)
        counts = torch.zeros_like(scores).scatter_add_(0, out, torch.ones_like(out, dtype=scores.dtype))
        scores -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(scores.dtype)


def _filter(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Top-k then top-p (nucleus) on one row of temperature-scaled scores."""
    if 0 < params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token once the ones before it already reach top_p; the first always stays.
        drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= params.top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return scores


def _report(token_id: int, logprobs: torch.Tensor | None, i: int, row: SamplingRow) -> SampledToken:
    if logprobs is None or not _wants_logprobs(row):
        return SampledToken(token_id)
    top: tuple[TokenLogprob, ...] = ()
    if row.params.top_n_tokens > 0:
        values, ids = torch.topk(logprobs[i], min(row.params.top_n_tokens, logprobs.shape[-1]))
        top = tuple(TokenLogprob(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True))
    return SampledToken(token_id, float(logprobs[i, token_id]), top)
