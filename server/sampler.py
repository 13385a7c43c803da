"""Next-token choice for a batch where every row has its own `SamplingParams`, on the device.

The whole batch goes through tensor ops: penalties (repetition as in `transformers`,
frequency/presence as in OpenAI) for the rows that set them, then temperature, top-k, top-p
and min-p for the rows that sample, and one draw for all of them by the exponential race
(`argmax(p / q)`, `q ~ Exp(1)`, as vLLM does), where a request with a seed fills its own `q`
row from its own `torch.Generator`, so its draws do not depend on what else is batched with
it. Everything the engine needs comes back in one device-to-host copy. A batch of greedy rows
without penalties or logprobs costs one `max` and that copy.

Defensive per row: a row whose logits hold NaN or +inf (or nothing finite) is reported as a
`RowFailure` for that request only; `torch.max` propagates NaN, so the greedy `max` doubles as
the check. Reported logprobs are those of the model's own distribution (before penalties and
temperature), like vLLM's default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from loraplex.server.request import TokenLogprob
from loraplex.server.sampling_params import SamplingParams

MIN_REPORTED_LOGPROB = -9999.0  # what vLLM reports for -inf, so the JSON stays valid


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


@dataclass(frozen=True)
class RowFailure:
    """This row's request cannot get a token (its logits are not usable); the others can."""

    error: str


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}

    def free(self, seq_id: int) -> None:
        """Forget a finished sequence's generator."""
        self._generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken | RowFailure]:
        """`logits`: float `[len(rows), vocab]`, one row per request that needs a token."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} requests")
        logits = logits.float()
        best, chosen = logits.max(dim=-1)
        ok = torch.isfinite(best)
        scores = logits
        penalized = [i for i, r in enumerate(rows) if r.params.has_penalties]
        if penalized:
            scores = _apply_penalties(logits, [rows[i] for i in penalized], penalized)
            chosen = scores.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if not r.params.is_greedy]
        if sampled:
            chosen = chosen.clone()
            chosen[_index(sampled, logits.device)] = self._draw(scores, [rows[i] for i in sampled], sampled)
        columns = [chosen.double(), ok.double()]
        top_n = max((r.params.top_n_tokens for r in rows), default=0)
        wants_logprobs = any(_wants_logprobs(r) for r in rows)
        if wants_logprobs:
            columns += _logprob_columns(logits, chosen, min(top_n, logits.shape[-1]))
        host = _pack(columns)
        return [_report(values, row, wants_logprobs) for values, row in zip(host.tolist(), rows, strict=True)]

    def _draw(self, scores: torch.Tensor, rows: list[SamplingRow], index: list[int]) -> torch.Tensor:
        """Temperature, filters and one draw for the sampled rows `index` of `scores`."""
        device = scores.device
        subset = scores[_index(index, device)]
        temperature = _column([r.params.temperature for r in rows], device)
        subset = (subset / temperature[:, None]).clamp(max=torch.finfo(subset.dtype).max)
        subset = torch.nan_to_num(subset, nan=0.0)  # failed rows: any token, reported as failures
        subset = _filter_batch(subset, [r.params for r in rows])
        probs = torch.softmax(subset, dim=-1)
        race = torch.empty_like(probs).exponential_()
        for j, row in enumerate(rows):
            generator = self._generator(row, device)
            if generator is not None:
                race[j].exponential_(generator=generator)
        return (probs / race).argmax(dim=-1)

    def _generator(self, row: SamplingRow, device: torch.device) -> torch.Generator | None:
        if row.params.seed is None:
            return None
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(row.params.seed)
            self._generators[row.seq_id] = generator
        return generator


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def _wants_logprobs(row: SamplingRow) -> bool:
    return row.params.logprobs or row.params.top_n_tokens > 0


def _padded(token_lists: list[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max(1, max(len(t) for t in token_lists))
    return torch.tensor(
        [[*t, *([pad] * (width - len(t)))] for t in token_lists], dtype=torch.long, device=device
    )


def _apply_penalties(logits: torch.Tensor, rows: list[SamplingRow], index: list[int]) -> torch.Tensor:
    """A copy of `logits` with the penalties of `rows` (at `index`) applied."""
    device, vocab = logits.device, logits.shape[-1]
    rows_index = _index(index, device)
    picked = logits[rows_index]
    seen_ids = _padded([[*r.prompt_token_ids, *r.output_token_ids] for r in rows], vocab, device)
    seen = torch.zeros(len(rows), vocab + 1, dtype=torch.bool, device=device).scatter_(1, seen_ids, True)
    rep = _column([r.params.repetition_penalty for r in rows], device)[:, None]
    penalized = torch.where(picked < 0, picked * rep, picked / rep)
    picked = torch.where(seen[:, :vocab], penalized, picked)
    out_ids = _padded([r.output_token_ids for r in rows], vocab, device)
    counts = torch.zeros(len(rows), vocab + 1, device=device).scatter_add_(
        1, out_ids, torch.ones_like(out_ids, dtype=torch.float32)
    )
    counts = counts[:, :vocab]
    frequency = _column([r.params.frequency_penalty for r in rows], device)[:, None]
    presence = _column([r.params.presence_penalty for r in rows], device)[:, None]
    picked = picked - frequency * counts - presence * (counts > 0).float()
    scores = logits.clone()
    scores[rows_index] = picked
    return scores


def _filter_batch(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p (on what top-k kept), and min-p (on the full distribution), per row."""
    vocab = scores.shape[-1]
    use_k = any(0 < p.top_k < vocab for p in params)
    use_p = any(p.top_p < 1.0 for p in params)
    use_min_p = any(p.min_p > 0.0 for p in params)
    if not (use_k or use_p or use_min_p):
        return scores
    device = scores.device
    ordered, order = torch.sort(scores, dim=-1, descending=True)
    drop = torch.zeros_like(ordered, dtype=torch.bool)
    if use_k:
        k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)
        drop |= ordered < ordered.gather(1, (k - 1)[:, None])  # ties with the k-th stay, as in transformers
    if use_p:
        probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
        top_p = _column([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device)[:, None]
        # Drop a token once the ones before it already reach top_p; the first always stays.
        drop |= (probs.cumsum(dim=-1) - probs) >= top_p
    if use_min_p:
        full = torch.softmax(ordered, dim=-1)
        min_p = _column([p.min_p for p in params], device)[:, None]
        drop |= full < min_p * full[:, :1]
    return scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def _filter(scores: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """`_filter_batch` for one row `[vocab]` (tests, tools)."""
    return _filter_batch(scores[None, :], [params])[0]


def _logprob_columns(logits: torch.Tensor, chosen: torch.Tensor, top_n: int) -> list[torch.Tensor]:
    logprobs = torch.log_softmax(logits, dim=-1).clamp(min=MIN_REPORTED_LOGPROB)
    columns = [logprobs.gather(1, chosen[:, None])[:, 0].double()]
    if top_n > 0:
        values, ids = torch.topk(logprobs, top_n, dim=-1)
        columns += [ids.double(), values.double()]
    return columns


def _pack(columns: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([c if c.dim() == 2 else c[:, None] for c in columns], dim=1)


def _report(values: list[float], row: SamplingRow, has_logprobs: bool) -> SampledToken | RowFailure:
    """One row of the host copy: `[token, ok, (logprob, top ids..., top values...)]`."""
    if not values[1]:
        return RowFailure("the model produced non-finite logits (NaN or inf) for this request")
    token_id = int(values[0])
    if not has_logprobs or not _wants_logprobs(row):
        return SampledToken(token_id)
    n = (len(values) - 3) // 2
    wanted = min(row.params.top_n_tokens, n)
    top = tuple(TokenLogprob(int(values[3 + j]), values[3 + n + j]) for j in range(wanted))
    return SampledToken(token_id, values[2], top)
