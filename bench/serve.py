"""HTTP load generator for a running `loraplex serve` (or any TGI / OpenAI compatible server).

Open loop (Poisson arrivals at `--rate` req/s) or closed loop (`--concurrency` clients),
prompt and output lengths drawn from uniform ranges, adapters chosen uniformly or by Zipf
popularity, always streaming so time to first token and inter-token latency are measured.
Output token counts are the server's own (OpenAI `usage`, TGI `details`); the arrival time of
every streamed token is kept (relative to the run's start) so that a window of the run (a
hot-load, say) can be summarised on its own (`window_summary`). `--vocab N` draws prompts
of `w<id>` words, what bench/random_checkpoint.py's tokenizer reads as random token ids.

    python bench/serve.py --url http://127.0.0.1:8080 --adapters a,b,c --num-requests 200 \
        --concurrency 32 --api openai --json out.json

`--compare-n 4` measures instead one request with `n=4` against 4 concurrent requests for the
same prompt (`--num-requests` rounds, `--prompt-words` HIGH words, `--output-tokens` LOW tokens;
bench/choices.py).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace

import aiohttp

WORDS = [
    "the",
    "model",
    "serves",
    "many",
    "tokens",
    "adapter",
    "team",
    "cluster",
    "request",
    "batch",
    "stream",
    "route",
    "cache",
    "queue",
    "prompt",
    "answer",
    "code",
    "query",
    "poem",
    "sea",
    "data",
    "fine",
    "tune",
    "base",
    "weights",
    "kernel",
    "slot",
    "pod",
    "node",
]


@dataclass(frozen=True)
class LoadSpec:
    url: str
    api: str  # "openai" (/v1/completions) or "tgi" (/generate_stream)
    adapters: tuple[str, ...]  # "" = base model
    num_requests: int
    concurrency: int | None  # closed loop when set
    rate: float | None  # Poisson arrivals (req/s) when set
    prompt_words: tuple[int, int]
    output_tokens: tuple[int, int]
    zipf: float | None  # popularity exponent; None = uniform
    seed: int
    api_key: str | None = None
    timeout_s: float = 600.0
    vocab: int | None = None  # prompts of `w<id>` words (random token ids) instead of WORDS
    base_model: str | None = None  # OpenAI `model` for base requests; None: asked from /info
    compare_n: int | None = None  # instead of a load: `n` choices vs `n` requests (bench/choices.py)


@dataclass
class RequestResult:
    adapter: str
    ok: bool
    status: int
    output_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None
    itl_s: list[float] = field(default_factory=list)
    error: str | None = None
    start_s: float = 0.0  # since the run's start
    token_times_s: list[float] = field(default_factory=list)  # arrival of each token, since the run's start


def pick_adapters(spec: LoadSpec, rng: random.Random) -> list[str]:
    names = list(spec.adapters)
    if spec.zipf:
        weights = [1.0 / (rank**spec.zipf) for rank in range(1, len(names) + 1)]
        return rng.choices(names, weights=weights, k=spec.num_requests)
    return [rng.choice(names) for _ in range(spec.num_requests)]


def _payload(spec: LoadSpec, adapter: str, prompt: str, max_tokens: int) -> tuple[str, dict]:
    if spec.api == "openai":
        body = {
            "model": adapter or spec.base_model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
        }
        return "/v1/completions", {k: v for k, v in body.items() if v is not None}
    parameters: dict = {"max_new_tokens": max_tokens, "details": True}
    if adapter:
        parameters["adapter_id"] = adapter
    return "/generate_stream", {"inputs": prompt, "parameters": parameters}


@dataclass(frozen=True)
class StreamEvent:
    """What one SSE data line tells the client."""

    tokens: int  # tokens it shows (a token whose text is held back shows none)
    final_count: int | None = None  # the server's count of generated tokens (OpenAI usage, TGI details)
    error: str | None = None  # an error reported inside the stream


def parse_event(spec: LoadSpec, data: str) -> StreamEvent:
    if data == "[DONE]":
        return StreamEvent(0)
    event = json.loads(data)
    if event.get("error"):
        return StreamEvent(0, error=json.dumps(event["error"])[:300])
    if spec.api == "openai":
        usage = event.get("usage") or {}
        return StreamEvent(1 if event.get("choices") else 0, usage.get("completion_tokens"))
    details = event.get("details") or {}
    return StreamEvent(1 if event.get("token") else 0, details.get("generated_tokens"))


async def run_one(
    session: aiohttp.ClientSession,
    spec: LoadSpec,
    adapter: str,
    prompt: str,
    max_tokens: int,
    origin: float = 0.0,
) -> RequestResult:
    """One streamed request; `origin` is the run's start (perf_counter) for absolute token times."""
    path, body = _payload(spec, adapter, prompt, max_tokens)
    start = time.perf_counter()
    result = RequestResult(adapter=adapter, ok=False, status=0, start_s=start - (origin or start))
    try:
        async with session.post(spec.url.rstrip("/") + path, json=body) as response:
            result.status = response.status
            if response.status != 200:
                result.error = (await response.text())[:300]
            else:
                await _read_stream(response, spec, result, start, origin or start)
    except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency_s = time.perf_counter() - start
    return result


async def _read_stream(
    response: aiohttp.ClientResponse, spec: LoadSpec, result: RequestResult, start: float, origin: float
) -> None:
    """Record token arrivals into `result`; ok unless the stream reports an error."""
    final_count, last = None, start
    async for raw in response.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        event = parse_event(spec, line[5:].strip())
        if event.error:
            result.error = event.error
            return
        final_count = event.final_count if event.final_count is not None else final_count
        if not event.tokens:
            continue
        now = time.perf_counter()
        if result.ttft_s is None:
            result.ttft_s = now - start
        else:
            result.itl_s.append(now - last)
        last = now
        result.token_times_s.append(now - origin)
        result.output_tokens += event.tokens
    result.output_tokens = final_count if final_count is not None else result.output_tokens
    result.ok = True


def make_requests(spec: LoadSpec) -> list[tuple[str, str, int]]:
    rng = random.Random(spec.seed)
    requests = []
    for adapter in pick_adapters(spec, rng):
        count = rng.randint(*spec.prompt_words)
        if spec.vocab:
            prompt = " ".join(f"w{rng.randrange(spec.vocab)}" for _ in range(count))
        else:
            prompt = " ".join(rng.choice(WORDS) for _ in range(count))
        requests.append((adapter, prompt, rng.randint(*spec.output_tokens)))
    return requests


async def base_model_name(session: aiohttp.ClientSession, url: str) -> str:
    """The name the server answers to for its base model (TGI `/info` `model_id`)."""
    async with session.get(url.rstrip("/") + "/info") as response:
        response.raise_for_status()
        return (await response.json())["model_id"]


async def run_load(spec: LoadSpec, origin: float | None = None) -> tuple[list[RequestResult], float]:
    """Send every request; (results, seconds). `origin`: perf_counter all times are relative to."""
    headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
    timeout = aiohttp.ClientTimeout(total=spec.timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        if spec.api == "openai" and "" in spec.adapters and spec.base_model is None:
            spec = replace(spec, base_model=await base_model_name(session, spec.url))
        requests = make_requests(spec)
        start = time.perf_counter()
        origin = origin or start
        if spec.concurrency:
            results = await _closed_loop(session, spec, requests, origin)
        else:
            results = await _open_loop(session, spec, requests, origin)
        return results, time.perf_counter() - start


async def _closed_loop(session, spec: LoadSpec, requests, origin: float) -> list[RequestResult]:
    queue = list(reversed(requests))
    results: list[RequestResult] = []

    async def client() -> None:
        while queue:
            results.append(await run_one(session, spec, *queue.pop(), origin=origin))

    await asyncio.gather(*(client() for _ in range(spec.concurrency or 1)))
    return results


async def _open_loop(session, spec: LoadSpec, requests, origin: float) -> list[RequestResult]:
    rng = random.Random(spec.seed + 1)
    tasks = []
    for request in requests:
        tasks.append(asyncio.create_task(run_one(session, spec, *request, origin=origin)))
        await asyncio.sleep(rng.expovariate(spec.rate or 1.0))
    return list(await asyncio.gather(*tasks))


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p50/p90/p99 by linear interpolation between closest ranks (numpy's default), and the mean."""
    if not values:
        return {"p50": None, "p90": None, "p99": None, "mean": None}
    ordered = sorted(values)

    def pick(q: float) -> float:
        position = q * (len(ordered) - 1)
        low = int(position)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (position - low)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "mean": statistics.fmean(ordered)}


def inter_token_gaps(results: list[RequestResult], start_s: float, end_s: float) -> list[float]:
    """Gaps between consecutive tokens of one request whose later token arrived in [start_s, end_s]."""
    return [
        later - earlier
        for r in results
        for earlier, later in itertools.pairwise(r.token_times_s)
        if start_s <= later <= end_s
    ]


def window_summary(results: list[RequestResult], start_s: float, end_s: float) -> dict:
    """Tokens, tok/s and inter-token latency of the tokens that arrived in a window of the run."""
    times = [t for r in results for t in r.token_times_s if start_s <= t <= end_s]
    gaps = inter_token_gaps(results, start_s, end_s)
    span = end_s - start_s
    return {
        "start_s": start_s,
        "end_s": end_s,
        "streamed_tokens": len(times),
        "streamed_tok_s": len(times) / span if span > 0 else 0.0,
        "itl_s": percentiles(gaps) | {"max": max(gaps, default=None)},
    }


def timeline(results: list[RequestResult], bin_s: float) -> list[dict]:
    """Per time bin: tokens that arrived, and the median and largest gap before each of them."""
    bins: dict[int, list[float]] = {}
    counts: dict[int, int] = {}
    for r in results:
        for i, t in enumerate(r.token_times_s):
            index = int(t // bin_s)
            counts[index] = counts.get(index, 0) + 1
            if i:
                bins.setdefault(index, []).append(t - r.token_times_s[i - 1])
    return [
        {
            "t_s": index * bin_s,
            "streamed_tokens": counts[index],
            "itl_p50_s": percentiles(bins.get(index, []))["p50"],
            "itl_max_s": max(bins.get(index, []), default=None),
        }
        for index in sorted(counts)
    ]


def summarize(spec: LoadSpec, results: list[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.output_tokens for r in ok)
    return {
        "spec": asdict(spec) | {"api_key": None},
        "duration_s": duration_s,
        "requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_statuses": sorted({r.status for r in results if not r.ok}),
        "first_errors": [r.error for r in results if not r.ok][:5],
        "output_tokens": tokens,
        "output_tok_s": tokens / duration_s if duration_s else 0.0,
        "requests_s": len(ok) / duration_s if duration_s else 0.0,
        "ttft_s": percentiles([r.ttft_s for r in ok if r.ttft_s is not None]),
        "itl_s": percentiles([gap for r in ok for gap in r.itl_s]),
        "latency_s": percentiles([r.latency_s for r in ok]),
    }


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def parse_args(argv: list[str] | None = None) -> tuple[LoadSpec, str | None]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--api", choices=("openai", "tgi"), default="openai")
    parser.add_argument(
        "--adapters", default="", help="comma list of adapter names; empty entry = base model"
    )
    parser.add_argument("--num-requests", type=int, default=100)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, help="closed loop with this many clients")
    mode.add_argument("--rate", type=float, help="open loop, Poisson arrivals per second")
    parser.add_argument("--prompt-words", type=_range, default=(16, 64), help="LOW:HIGH words per prompt")
    parser.add_argument("--output-tokens", type=_range, default=(32, 128), help="LOW:HIGH new tokens")
    parser.add_argument("--zipf", type=float, default=None, help="Zipf exponent for adapter popularity")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--vocab", type=int, default=None, help="prompts of random `w<id>` words, ids < VOCAB"
    )
    parser.add_argument("--base-model", default=None, help="OpenAI `model` of base requests (default: /info)")
    parser.add_argument("--json", dest="json_path", default=None, help="write the summary here")
    parser.add_argument("--compare-n", type=int, default=None,
                        help="instead: one request with n=N vs N requests, same prompt, --num-requests rounds")  # fmt: skip
    args = parser.parse_args(argv)
    if args.concurrency is None and args.rate is None:
        args.concurrency = 8
    spec = LoadSpec(
        url=args.url,
        api=args.api,
        adapters=tuple(args.adapters.split(",")) if args.adapters else ("",),
        num_requests=args.num_requests,
        concurrency=args.concurrency,
        rate=args.rate,
        prompt_words=args.prompt_words,
        output_tokens=args.output_tokens,
        zipf=args.zipf,
        seed=args.seed,
        api_key=args.api_key,
        vocab=args.vocab,
        base_model=args.base_model,
        compare_n=args.compare_n,
    )
    return spec, args.json_path


def main(argv: list[str] | None = None) -> int:
    spec, json_path = parse_args(argv)
    if spec.compare_n is not None:
        from choices import CompareSpec, compare

        adapter = spec.adapters[0] or spec.base_model
        words, tokens = spec.prompt_words[1], spec.output_tokens[0]
        summary = asyncio.run(
            compare(CompareSpec(spec.url, adapter, spec.compare_n, spec.num_requests, words, tokens))
        )
    else:
        results, duration = asyncio.run(run_load(spec))
        summary = summarize(spec, results, duration)
    text = json.dumps(summary, indent=2)
    if json_path:
        with open(json_path, "w") as handle:
            handle.write(text + "\n")
    print(text)
    return 0 if summary.get("errors", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
