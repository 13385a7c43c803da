"""`n` choices in one request against `n` separate requests for the same prompt (`serve.py --compare-n N`).

Each round draws a fresh prompt (so no round profits from an earlier one's prefix cache),
then, in alternating order, sends one `/v1/completions` request with `n=N` and N concurrent
requests with `n=1`, all with the same prompt, `max_tokens` and `ignore_eos`. Reported: wall
time of each, their ratio per round (median, min, max) and the prompt tokens the server served
from its prefix cache (`vllm:prefix_cache_hits_total`) in each mode.
"""

from __future__ import annotations

import asyncio
import random
import re
import statistics
import time
from dataclasses import dataclass

import aiohttp

_HITS = re.compile(r"^vllm:prefix_cache_hits_total\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


@dataclass(frozen=True)
class CompareSpec:
    url: str
    model: str | None
    n: int
    rounds: int
    prompt_words: int
    max_tokens: int
    seed: int = 0


async def _prefix_hits(session: aiohttp.ClientSession, url: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        return sum(float(v) for v in _HITS.findall(await response.text()))


async def _complete(session: aiohttp.ClientSession, spec: CompareSpec, prompt: str, n: int) -> int:
    body = {"prompt": prompt, "max_tokens": spec.max_tokens, "n": n, "temperature": 1.0, "ignore_eos": True}
    if spec.model:
        body["model"] = spec.model
    async with session.post(f"{spec.url}/v1/completions", json=body) as response:
        out = await response.json()
        if response.status != 200:
            raise RuntimeError(f"{response.status}: {out}")
        return out["usage"]["completion_tokens"]


async def _timed(
    session: aiohttp.ClientSession, spec: CompareSpec, prompt: str, together: bool
) -> tuple[float, float]:
    """(seconds, prefix-cache hit tokens) of one mode for one prompt."""
    hits = await _prefix_hits(session, spec.url)
    start = time.perf_counter()
    if together:
        tokens = await _complete(session, spec, prompt, spec.n)
    else:
        tokens = sum(await asyncio.gather(*(_complete(session, spec, prompt, 1) for _ in range(spec.n))))
    elapsed = time.perf_counter() - start
    if tokens != spec.n * spec.max_tokens:
        raise RuntimeError(f"expected {spec.n * spec.max_tokens} tokens, got {tokens}")
    return elapsed, await _prefix_hits(session, spec.url) - hits


async def compare(spec: CompareSpec) -> dict:
    rng = random.Random(spec.seed)
    together, separate, ratios, hits_together, hits_separate = [], [], [], [], []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        for round_ in range(spec.rounds):
            words = [f"w{rng.randrange(1, 10_000)}" for _ in range(2 * spec.prompt_words)]
            prompts = (" ".join(words[: spec.prompt_words]), " ".join(words[spec.prompt_words :]))
            order = (True, False) if round_ % 2 == 0 else (False, True)  # interleaved: drift hits both
            result = {}
            for mode, prompt in zip(order, prompts, strict=True):
                result[mode] = await _timed(session, spec, prompt, mode)
            together.append(result[True][0])
            separate.append(result[False][0])
            hits_together.append(result[True][1])
            hits_separate.append(result[False][1])
            ratios.append(result[True][0] / result[False][0])
    return {
        "n": spec.n,
        "rounds": spec.rounds,
        "prompt_words": spec.prompt_words,
        "max_tokens": spec.max_tokens,
        "together_s_median": statistics.median(together),
        "separate_s_median": statistics.median(separate),
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "prefix_hit_tokens_together_median": statistics.median(hits_together),
        "prefix_hit_tokens_separate_median": statistics.median(hits_separate),
    }
