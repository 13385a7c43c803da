"""bench/serve.py's pure parts: adapter popularity, prompts, payloads, percentiles, summaries, windows."""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest


@pytest.fixture
def spec(bench_serve):
    return bench_serve.LoadSpec(
        url="http://x", api="openai", adapters=tuple(f"a{i}" for i in range(10)), num_requests=20000,
        concurrency=4, rate=None, prompt_words=(3, 9), output_tokens=(5, 7), zipf=None, seed=7,
    )  # fmt: skip


def test_uniform_picks_every_adapter_about_equally(bench_serve, spec):
    counts = Counter(bench_serve.pick_adapters(spec, random.Random(0)))
    assert set(counts) == set(spec.adapters)
    assert max(counts.values()) / min(counts.values()) < 1.2


def test_zipf_popularity_follows_the_rank_law(bench_serve, spec):
    zipf = replace(spec, zipf=1.2)
    counts = Counter(bench_serve.pick_adapters(zipf, random.Random(0)))
    weights = [1 / rank**1.2 for rank in range(1, 11)]
    expected = [w / sum(weights) for w in weights]
    observed = [counts[f"a{i}"] / zipf.num_requests for i in range(10)]
    assert observed == pytest.approx(expected, abs=0.01)
    assert observed[0] > 3 * observed[5]  # the head really dominates


def test_requests_are_deterministic_and_within_the_ranges(bench_serve, spec):
    small = replace(spec, num_requests=50)
    first, again = bench_serve.make_requests(small), bench_serve.make_requests(small)
    assert first == again
    assert first != bench_serve.make_requests(replace(small, seed=8))
    for adapter, prompt, max_tokens in first:
        assert adapter in spec.adapters
        assert 3 <= len(prompt.split()) <= 9
        assert 5 <= max_tokens <= 7


def test_vocab_prompts_are_random_token_words(bench_serve, spec):
    requests = bench_serve.make_requests(replace(spec, num_requests=30, vocab=100))
    words = [w for _, prompt, _ in requests for w in prompt.split()]
    assert all(w.startswith("w") and 0 <= int(w[1:]) < 100 for w in words)
    assert len(set(words)) > 50  # no shared prefixes for the prefix cache to exploit


def test_payloads_fix_the_output_length_on_both_apis(bench_serve, spec):
    path, body = bench_serve._payload(replace(spec, base_model="base-m"), "", "hi", 9)
    assert path == "/v1/completions"
    assert body["model"] == "base-m" and body["max_tokens"] == 9 and body["ignore_eos"] and body["stream"]
    assert body["stream_options"] == {"include_usage": True}  # the server's own token count
    path, body = bench_serve._payload(replace(spec, api="tgi"), "a3", "hi", 9)
    assert path == "/generate_stream"
    assert body["parameters"]["adapter_id"] == "a3" and body["parameters"]["max_new_tokens"] == 9
    _, base = bench_serve._payload(replace(spec, api="tgi"), "", "hi", 9)
    assert "adapter_id" not in base["parameters"]


def test_sse_events(bench_serve, spec):
    parse = bench_serve.parse_event
    assert parse(spec, json.dumps({"choices": [{"text": "x"}]})).tokens == 1
    usage = parse(spec, json.dumps({"choices": [], "usage": {"completion_tokens": 3}}))
    assert (usage.tokens, usage.final_count) == (0, 3)
    assert parse(spec, "[DONE]").tokens == 0
    assert "overloaded" in parse(spec, json.dumps({"error": {"code": "overloaded"}})).error
    tgi = replace(spec, api="tgi")
    assert parse(
        tgi, json.dumps({"token": {"id": 3, "text": "x"}, "details": None})
    ) == bench_serve.StreamEvent(1)
    last = parse(tgi, json.dumps({"token": {"id": 3}, "details": {"generated_tokens": 7}}))
    assert (last.tokens, last.final_count) == (1, 7)


def test_percentiles_match_numpy(bench_serve):
    values = [random.Random(3).expovariate(1.0) for _ in range(257)]
    found = bench_serve.percentiles(values)
    assert [found["p50"], found["p90"], found["p99"]] == pytest.approx(np.percentile(values, [50, 90, 99]))
    assert found["mean"] == pytest.approx(np.mean(values))
    assert bench_serve.percentiles([]) == {"p50": None, "p90": None, "p99": None, "mean": None}
    assert bench_serve.percentiles([2.0])["p99"] == 2.0


def _result(bench_serve, times, ok=True, status=200):
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return bench_serve.RequestResult(
        adapter="a0", ok=ok, status=status, output_tokens=len(times), latency_s=(times or [0])[-1],
        ttft_s=times[0] if times else None, itl_s=gaps, token_times_s=list(times),
        error=None if ok else "boom",
    )  # fmt: skip


def test_summary_counts_only_completed_requests(bench_serve, spec):
    results = [_result(bench_serve, [0.1, 0.2, 0.4]), _result(bench_serve, [0.3, 0.5]),
               _result(bench_serve, [], ok=False, status=429)]  # fmt: skip
    summary = bench_serve.summarize(spec, results, duration_s=2.0)
    assert (summary["requests"], summary["completed"], summary["errors"]) == (3, 2, 1)
    assert summary["error_statuses"] == [429] and summary["first_errors"] == ["boom"]
    assert summary["output_tokens"] == 5 and summary["output_tok_s"] == 2.5
    assert summary["requests_s"] == 1.0
    assert summary["ttft_s"]["p50"] == pytest.approx(0.2)
    assert summary["itl_s"]["p50"] == pytest.approx(0.2)
    assert summary["spec"]["api_key"] is None


def test_windows_and_timeline_see_the_spike_where_it_happened(bench_serve):
    steady = [i * 0.01 for i in range(100)]  # 10 ms gaps for a second...
    stalled = [0.0, 0.01, 0.02, 0.52, 0.53]  # ...but one request waits 500 ms at 0.52
    results = [_result(bench_serve, steady), _result(bench_serve, stalled)]
    during = bench_serve.window_summary(results, 0.5, 0.6)
    assert during["itl_s"]["max"] == pytest.approx(0.5)
    before = bench_serve.window_summary(results, 0.0, 0.49)
    assert before["itl_s"]["max"] == pytest.approx(0.01)
    assert before["streamed_tokens"] == 50 + 3
    bins = bench_serve.timeline(results, bin_s=0.1)
    assert sum(b["streamed_tokens"] for b in bins) == 105
    spike = max(bins, key=lambda b: b["itl_max_s"] or 0)
    assert spike["t_s"] == pytest.approx(0.5)


def test_cli_modes(bench_serve):
    spec, path = bench_serve.parse_args(["--rate", "3", "--adapters", "a,,b", "--json", "o.json"])
    assert (spec.rate, spec.concurrency, path) == (3.0, None, "o.json")
    assert spec.adapters == ("a", "", "b")
    spec, _ = bench_serve.parse_args(["--output-tokens", "16", "--prompt-words", "4:8"])
    assert spec.concurrency == 8 and spec.output_tokens == (16, 16) and spec.prompt_words == (4, 8)
    assert spec.adapters == ("",)
