"""Prompt log-probabilities from a step's hidden states (the model runner's side of prompt_logprobs.py).

Only the rows of chunks that ask are turned into logits, a slice of rows at a time, so a long
prompt never holds `[tokens, vocab]` float32 logits at once and other requests cost nothing.
Ranks follow vLLM: the number of tokens at least as likely as the prompt token (1 = the best).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from loraplex.server.prompt_logprobs import PromptScoring
from loraplex.server.request import PromptTokenLogprob, TokenLogprob

ROWS_PER_SLICE = 256  # logits rows materialised at once: 256 x a 256k vocabulary = 256 MiB float32


def score_prompt(
    compute_logits: Callable[[torch.Tensor], torch.Tensor], hidden: torch.Tensor, scoring: PromptScoring
) -> list[PromptTokenLogprob]:
    """Entries for `scoring.target_ids`; `hidden` [n >= len(target_ids), H] are the chunk's rows."""
    targets = torch.tensor(scoring.target_ids, dtype=torch.long, device=hidden.device)
    entries: list[PromptTokenLogprob] = []
    for lo in range(0, targets.shape[0], ROWS_PER_SLICE):
        hi = min(lo + ROWS_PER_SLICE, targets.shape[0])
        logprobs = torch.log_softmax(compute_logits(hidden[lo:hi]).float(), dim=-1)  # [rows, vocab]
        entries += _entries(logprobs, targets[lo:hi], scoring.num_top)
    return entries


def _entries(logprobs: torch.Tensor, targets: torch.Tensor, num_top: int) -> list[PromptTokenLogprob]:
    chosen = logprobs.gather(1, targets[:, None])  # [rows, 1]
    ranks = (logprobs >= chosen).sum(dim=1)
    k = min(num_top, logprobs.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=1) if k else (chosen[:, :0], targets[:, None][:, :0])
    rows = zip(
        targets.tolist(),
        chosen[:, 0].tolist(),
        ranks.tolist(),
        top_ids.tolist(),
        top_values.tolist(),
        strict=True,
    )
    return [
        PromptTokenLogprob(token, logprob, rank, tuple(map(TokenLogprob, ids, values)))
        for token, logprob, rank, ids, values in rows
    ]
