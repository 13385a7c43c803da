"""Next-token choice for a batch where every row has its own `SamplingParams`, on the device.

The whole batch goes through tensor ops: penalties (repetition as in `transformers`,
frequency/presence as in OpenAI) for the rows that set them, then temperature, top-k, top-p
and min-p for the rows that sample, and one draw for all of them by the exponential race
(`argmax(p / q)`, `q ~ Exp(1)`, as vLLM does), where a request with a seed fills its own `q`
row from its own `torch.Generator`, so its draws do not depend on what else is batched with
it. Everything the engine needs comes back in one device-to-host copy. A batch of greedy rows
without penalties or logprobs costs one `max`, the finiteness check and that copy. What depends
only on the rows' settings (index lists, parameter columns, generators) is built once per batch
membership, and penalties keep each sequence's token counts in a persistent row updated with its
new tokens only (`PenaltyCounts`).

Defensive per row: a row whose logits hold NaN or +inf (or nothing finite) is reported as a
`RowFailure` for that request only; `torch.max` propagates NaN, so the greedy `max` doubles as
the check. Reported logprobs are those of the model's own distribution (before penalties and
temperature), like vLLM's default.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

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


class SampledToken(NamedTuple):
    """A row's token (a tuple: the engine makes one per request per step, cheaply)."""

    token_id: int
    logprob: float | None = None
    top_logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class RowFailure:
    """This row's request cannot get a token (its logits are not usable); the others can."""

    error: str


class Sampler:
    """Samples batches of rows; what depends only on the rows' settings is kept between calls.

    A call with the very same rows as the last one (the engine passes each request's one
    `SamplingRow` every step) reuses the last call's plan: which rows are penalized, sampled or
    want logprobs, and their parameter columns on the device. Only a batch whose membership
    changed builds a new plan, so a step of greedy rows costs the same whatever the batch size.
    """

    def __init__(self) -> None:
        self._generators: dict[int, torch.Generator] = {}
        self._penalties = PenaltyCounts()
        self._plan: _Plan | None = None
        self._plan_rows: tuple[SamplingRow, ...] | None = None
        # When `_plan_rows` are all greedy (no penalties, no logprobs) on the CPU: `sample_ids` then
        # needs no plan at all, only the `max` into these columns.
        self._greedy: _GreedyColumns | None = None

    def free(self, seq_id: int) -> None:
        """Forget a finished sequence's generator and token counts."""
        self._generators.pop(seq_id, None)
        self._penalties.free(seq_id)
        self._plan = self._plan_rows = self._greedy = None

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[SampledToken | RowFailure]:
        """`logits`: float `[len(rows), vocab]`, one row per request that needs a token."""
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} requests")
        plan = self._plan_for(rows, logits.shape[-1], logits.device)
        logits = logits.float()
        best, chosen = self._choose(logits, plan)
        ok = torch.isfinite(best)
        if not plan.wants_logprobs:
            return [SampledToken(t) if t >= 0 else NON_FINITE for t in torch.where(ok, chosen, -1).tolist()]
        columns = [chosen.double(), ok.double(), *_logprob_columns(logits, chosen, plan.top_n)]
        host = _pack(columns)
        return [_report(values, row) for values, row in zip(host.tolist(), rows, strict=True)]

    def _choose(self, logits: torch.Tensor, plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's best logit (NaN/inf: a failed row) and its token: greedy, penalized or drawn."""
        best, chosen = logits.max(dim=-1)
        scores = logits
        if plan.penalized:
            scores = self._penalties.apply(logits, plan)
            chosen = scores.argmax(dim=-1)
        if plan.sampled:
            chosen = chosen.clone()
            chosen[plan.sampled_index] = _draw(scores, plan)
        return best, chosen

    def sample_ids(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
        """`__call__` as a column: int64 [len(rows)] token ids, -1 for a row with non-finite logits.

        For batches that want no logprobs (ValueError otherwise): the steady decode path of the
        engine, which makes no per-row object. The engine's steady batch passes the same tuple of
        greedy rows every step: on the CPU that is one `max` into persistent columns, read through
        memoryviews, with no plan lookup and no tensor made.
        """
        greedy = self._greedy
        if (
            greedy is not None
            and rows is self._plan_rows
            and logits.shape == greedy.shape
            and logits.dtype is _FLOAT32
            and logits.is_cpu
        ):
            torch.max(logits, 1, False, out=greedy.out)
            return _ids_of(greedy.ids.tolist(), greedy.bests)
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"logits {tuple(logits.shape)} for {len(rows)} requests")
        plan = self._plan_for(rows, logits.shape[-1], logits.device)
        if plan.wants_logprobs:
            raise ValueError("sample_ids is for batches without logprobs")
        if logits.is_cpu and plan.greedy:
            return _greedy_ids(logits)
        best, chosen = self._choose(logits if logits.dtype == torch.float32 else logits.float(), plan)
        if chosen.device.type != "cpu":  # one device-to-host copy
            return torch.where(torch.isfinite(best), chosen, -1).tolist()
        return _ids_of(chosen.tolist(), best.tolist())

    def _plan_for(self, rows: Sequence[SamplingRow], vocab: int, device: torch.device) -> _Plan:
        plan = self._plan
        if plan is not None and rows is self._plan_rows and plan.vocab == vocab and plan.device == device:
            return plan  # the very same (immutable) tuple of rows as last time
        self._plan_rows, self._greedy = (rows if isinstance(rows, tuple) else None), None
        if (
            plan is None
            or plan.vocab != vocab
            or plan.device != device
            or len(plan.rows) != len(rows)
            or not all(map(operator.is_, plan.rows, rows))
        ):
            plan = self._plan = _Plan.build(list(rows), vocab, device, self._generator)
        if plan.greedy and self._plan_rows is not None and device.type == "cpu":
            self._greedy = _GreedyColumns(len(rows), vocab)
        return plan

    def _generator(self, row: SamplingRow, device: torch.device) -> torch.Generator | None:
        if row.params.seed is None:
            return None
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=device)
            generator.manual_seed(row.params.seed)
            self._generators[row.seq_id] = generator
        return generator


_FLOAT32 = torch.float32


class _GreedyColumns:
    """A greedy CPU batch's `max` output, made once per batch membership: the values (float32)
    and indices of `shape[0]` rows, and memoryviews that read them without a tensor op."""

    __slots__ = ("bests", "ids", "out", "shape")

    def __init__(self, num_rows: int, vocab: int) -> None:
        with torch.inference_mode(False):  # usable in and out of inference mode
            best = torch.zeros(num_rows, dtype=_FLOAT32)
            ids = torch.zeros(num_rows, dtype=torch.int64)
        self.shape = (num_rows, vocab)
        self.out = (best, ids)
        self.bests = memoryview(best.numpy())
        self.ids = memoryview(ids.numpy())


def _greedy_ids(logits: torch.Tensor) -> list[int]:
    """Each CPU row's argmax, -1 where its logits are not usable (NaN, +inf, nothing finite).

    One `max` (it propagates NaN, so its values double as the check) and its two columns read as
    they are: no tensor op after it. The dtype needs no conversion (float32's is exact and
    monotonic: the same token, the same finiteness).
    """
    best, chosen = logits.max(dim=-1)
    return _ids_of(chosen.tolist(), best.tolist())


def _ids_of(tokens: list[int], bests: Iterable[float]) -> list[int]:
    """`tokens`, -1 where the row's best logit is not finite. The sum of the best logits is finite
    exactly when every one is (float64 does not overflow on float32 values)."""
    if math.isfinite(sum(bests)):
        return tokens
    return [t if math.isfinite(b) else -1 for t, b in zip(tokens, bests, strict=True)]


NON_FINITE = RowFailure("the model produced non-finite logits (NaN or inf) for this request")


@dataclass(frozen=True)
class _Plan:
    """What a batch of rows asks for, as index lists and parameter columns on the device."""

    rows: list[SamplingRow]
    vocab: int
    device: torch.device
    penalized: list[int]
    penalized_index: torch.Tensor | None
    penalty_columns: tuple[torch.Tensor, ...]  # repetition, frequency, presence: [P, 1] each
    sampled: list[int]
    sampled_index: torch.Tensor | None
    temperature: torch.Tensor | None  # [S, 1]
    filters: Filters | None
    generators: tuple[tuple[int, torch.Generator], ...]  # (position among the sampled rows, generator)
    top_n: int
    wants_logprobs: bool
    greedy: bool  # no row penalized, sampled or asking for logprobs

    @classmethod
    def build(
        cls,
        rows: list[SamplingRow],
        vocab: int,
        device: torch.device,
        generator_of: Callable[[SamplingRow, torch.device], torch.Generator | None],
    ) -> _Plan:
        params = [r.params for r in rows]
        logprobs = any(wants_logprobs(p) for p in params)
        penalized = [i for i, p in enumerate(params) if p.has_penalties]
        sampled = [i for i, p in enumerate(params) if not p.is_greedy]
        picked = [params[i] for i in penalized]
        penalty_columns = tuple(
            _column([getattr(p, name) for p in picked], device)[:, None]
            for name in ("repetition_penalty", "frequency_penalty", "presence_penalty")
        )
        drawn = [params[i] for i in sampled]
        generators = tuple(
            (j, g) for j, i in enumerate(sampled) if (g := generator_of(rows[i], device)) is not None
        )
        return cls(
            rows=rows,
            vocab=vocab,
            device=device,
            penalized=penalized,
            penalized_index=_index(penalized, device) if penalized else None,
            penalty_columns=penalty_columns if penalized else (),
            sampled=sampled,
            sampled_index=_index(sampled, device) if sampled else None,
            temperature=_column([p.temperature for p in drawn], device)[:, None] if sampled else None,
            filters=Filters.of(drawn, vocab, device) if sampled else None,
            generators=generators,
            top_n=min(max((p.top_n_tokens for p in params), default=0), vocab),
            wants_logprobs=logprobs,
            greedy=not penalized and not sampled and not logprobs,
        )


def _draw(scores: torch.Tensor, plan: _Plan) -> torch.Tensor:
    """Temperature, filters and one draw for the plan's sampled rows of `scores`."""
    subset = scores[plan.sampled_index]
    subset = (subset / plan.temperature).clamp(max=torch.finfo(subset.dtype).max)
    subset = torch.nan_to_num(subset, nan=0.0)  # failed rows: any token, reported as failures
    subset = plan.filters.apply(subset)  # type: ignore[union-attr]
    probs = torch.softmax(subset, dim=-1)
    race = torch.empty_like(probs).exponential_()
    for j, generator in plan.generators:
        race[j].exponential_(generator=generator)
    return (probs / race).argmax(dim=-1)


class PenaltyCounts:
    """Per sequence, a persistent row of which tokens it has seen and how often it generated each.

    A sequence's row is filled once from its tokens so far, then each call adds only the tokens
    its `SamplingRow` gained since the last one (one `index_put_` for the whole batch), so
    penalties cost O(new tokens) per step, not O(all tokens).
    """

    def __init__(self) -> None:
        self._seen: torch.Tensor | None = None  # bool [capacity, vocab]: in the prompt or the output
        self._counts: torch.Tensor | None = None  # float32 [capacity, vocab]: times generated
        self._entries: dict[int, _Counted] = {}
        self._free: list[int] = []

    def free(self, seq_id: int) -> None:
        entry = self._entries.pop(seq_id, None)
        if entry is not None:
            self._free.append(entry.slot)

    def apply(self, logits: torch.Tensor, plan: _Plan) -> torch.Tensor:
        """A copy of `logits` with the penalties of the plan's penalized rows applied."""
        slots = self._update([plan.rows[i] for i in plan.penalized], logits.shape[-1], logits.device)
        seen, counts = self._seen[slots], self._counts[slots]  # type: ignore[index]
        rep, frequency, presence = plan.penalty_columns
        picked = logits[plan.penalized_index]
        penalized = torch.where(picked < 0, picked * rep, picked / rep)
        picked = torch.where(seen, penalized, picked)
        picked = picked - frequency * counts - presence * (counts > 0).float()
        scores = logits.clone()
        scores[plan.penalized_index] = picked
        return scores

    def _update(self, rows: list[SamplingRow], vocab: int, device: torch.device) -> torch.Tensor:
        """Bring the rows' counts up to date; the slot of each row, as an index tensor."""
        self._fit(vocab, device)
        slots, claimed, seen_at, counted_at = [], [], ([], []), ([], [])
        for row in rows:
            entry = self._entries.get(row.seq_id)
            out = row.output_token_ids
            if entry is None or entry.row is not row or entry.num_counted > len(out):
                entry = self._claim(row)
                claimed.append(entry.slot)
                seen_at[0].extend([entry.slot] * len(row.prompt_token_ids))
                seen_at[1].extend(row.prompt_token_ids)
            new = out[entry.num_counted :]
            counted_at[0].extend([entry.slot] * len(new))
            counted_at[1].extend(new)
            entry.num_counted = len(out)
            slots.append(entry.slot)
        seen, counts = self._seen, self._counts
        if claimed:
            index = _index(claimed, device)
            seen[index], counts[index] = False, 0.0  # type: ignore[index]
        for at in (seen_at, counted_at):
            if at[0]:
                seen[_index(at[0], device), _index(at[1], device)] = True  # type: ignore[index]
        if counted_at[0]:
            at = (_index(counted_at[0], device), _index(counted_at[1], device))
            counts.index_put_(at, torch.ones(len(counted_at[0]), device=device), accumulate=True)  # type: ignore[union-attr]
        return _index(slots, device)

    def _fit(self, vocab: int, device: torch.device) -> None:
        seen = self._seen
        if seen is None or seen.shape[1] != vocab or seen.device != device:
            self._entries.clear()
            self._free = []
            self._seen = torch.zeros(0, vocab, dtype=torch.bool, device=device)
            self._counts = torch.zeros(0, vocab, device=device)

    def _claim(self, row: SamplingRow) -> _Counted:
        self.free(row.seq_id)
        if not self._free:
            self._grow()
        entry = self._entries[row.seq_id] = _Counted(self._free.pop(), row)
        return entry

    def _grow(self) -> None:
        seen, counts = self._seen, self._counts
        old = seen.shape[0]  # type: ignore[union-attr]
        extra = max(16, old)
        self._seen = torch.cat([seen, seen.new_zeros(extra, seen.shape[1])])  # type: ignore[union-attr]
        self._counts = torch.cat([counts, counts.new_zeros(extra, counts.shape[1])])  # type: ignore[union-attr]
        self._free.extend(range(old + extra - 1, old - 1, -1))


@dataclass
class _Counted:
    slot: int
    row: SamplingRow
    num_counted: int = 0  # output tokens of `row` already in the counts


def _index(rows: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.long, device=device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device)


def wants_logprobs(params: SamplingParams) -> bool:
    return params.logprobs or params.top_n_tokens > 0


@dataclass(frozen=True)
class Filters:
    """Top-k, top-p and min-p of a batch of sampled rows, as columns on the device (None: off for all)."""

    top_k: torch.Tensor | None  # int64 [S, 1], the vocabulary for rows without top-k
    top_p: torch.Tensor | None  # [S, 1], 2.0 for rows without top-p
    min_p: torch.Tensor | None  # [S, 1]

    @classmethod
    def of(cls, params: list[SamplingParams], vocab: int, device: torch.device) -> Filters:
        use_k = any(0 < p.top_k < vocab for p in params)
        use_p = any(p.top_p < 1.0 for p in params)
        use_min_p = any(p.min_p > 0.0 for p in params)
        return cls(
            top_k=_index([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device)[:, None]
            if use_k
            else None,
            top_p=_column([p.top_p if p.top_p < 1.0 else 2.0 for p in params], device)[:, None]
            if use_p
            else None,
            min_p=_column([p.min_p for p in params], device)[:, None] if use_min_p else None,
        )

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k, then top-p (on what top-k kept), and min-p (on the full distribution), per row."""
        if self.top_k is None and self.top_p is None and self.min_p is None:
            return scores
        ordered, order = torch.sort(scores, dim=-1, descending=True)
        drop = torch.zeros_like(ordered, dtype=torch.bool)
        if self.top_k is not None:
            drop |= ordered < ordered.gather(1, self.top_k - 1)  # ties with the k-th stay, as in transformers
        if self.top_p is not None:
            probs = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
            # Drop a token once the ones before it already reach top_p; the first always stays.
            drop |= (probs.cumsum(dim=-1) - probs) >= self.top_p
        if self.min_p is not None:
            full = torch.softmax(ordered, dim=-1)
            drop |= full < self.min_p * full[:, :1]
        return scores.masked_fill(torch.zeros_like(drop).scatter(1, order, drop), float("-inf"))


def _filter_batch(scores: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """`Filters` for rows `scores` `[len(params), vocab]` (tests, tools)."""
    return Filters.of(params, scores.shape[-1], scores.device).apply(scores)


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


def _report(values: list[float], row: SamplingRow) -> SampledToken | RowFailure:
    """One row of the host copy: `[token, ok, logprob, top ids..., top values...]`."""
    if not values[1]:
        return NON_FINITE
    token_id = int(values[0])
    if not wants_logprobs(row.params):
        return SampledToken(token_id)
    n = (len(values) - 3) // 2
    wanted = min(row.params.top_n_tokens, n)
    top = tuple(TokenLogprob(int(values[3 + j]), values[3 + n + j]) for j in range(wanted))
    return SampledToken(token_id, values[2], top)
