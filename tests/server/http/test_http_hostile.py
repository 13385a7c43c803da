"""Each hostile class of issue 15, with other requests streaming at the same time: the bad request
gets a 4xx, the streams keep exactly the tokens of a quiet run, the probes stay fast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hostile_support import (
    BAD_ADAPTERS,
    HealthProbe,
    Hostile,
    Streams,
    json_body,
    quiet_tokens,
    run_hostile,
    send,
    stream_jobs,
    unexpected,
)
from http_server_support import LiveServer, ServerThread, call, start_server

from loraplex.server.demo_assets import TinyAssets
from loraplex.server.routes.blocking import body_limit

MAX_INPUT_TOKENS = 256
NUM_STREAMS = 6


@pytest.fixture(scope="module")
def server(server_thread: ServerThread, tiny_assets: TinyAssets) -> Iterator[LiveServer]:
    adapters = dict(tiny_assets.adapters["llama"])
    live = start_server(
        server_thread,
        tiny_assets,
        adapters,
        max_input_tokens=MAX_INPUT_TOKENS,
        max_total_tokens=MAX_INPUT_TOKENS + 64,
        max_concurrent_requests=128,
        max_lora_rank=16,
    )
    yield live
    server_thread.run(live.engine.shutdown(timeout_s=2.0))


@pytest.fixture(scope="module")
def jobs(server: LiveServer) -> list[tuple[str | None, str]]:
    return stream_jobs([None, *sorted(server.adapters)], NUM_STREAMS)


@pytest.fixture(scope="module")
def quiet(server: LiveServer, jobs) -> dict:
    return quiet_tokens(server.url, jobs)


def _check_class(server: LiveServer, jobs, quiet, cases: list[Hostile], rounds: int = 2) -> None:
    streams = Streams(server.url, jobs)
    results = run_hostile(server.url, cases, rounds)
    streams.assert_unchanged(quiet)
    assert not unexpected(results, cases), unexpected(results, cases)
    assert call("GET", f"{server.url}/health")[0] == 200


def _cases(server: LiveServer, names: set[str], bad_dirs: dict[str, str] | None = None) -> list[Hostile]:
    from hostile_support import hostile_requests

    adapter = sorted(server.adapters)[0]
    cases = hostile_requests(server.engine.model_name, adapter, bad_dirs or {}, body_limit(MAX_INPUT_TOKENS))
    return [c for c in cases if c.name in names or (bad_dirs and c.name.startswith("adapter: "))]


SAMPLING_LIMITS = {
    "tiny temperature",
    "huge temperature",
    "seed 2**64",
    "seed 2**64 tgi",
    "tiny top_p",
    "huge repetition penalty",
    "tiny repetition penalty",
    "NaN temperature",
    "Infinity penalty",
    "huge max_new_tokens",
    "huge top_k",
}
CLIENT_MISTAKES = {
    "5000-digit integer",
    "JSON nested 100k deep",
    "truncated JSON",
    "not UTF-8",
    "lone surrogate in chat",
    "lone surrogate prompt",
    "unknown adapter",
    "lora_path with NUL",
}


def test_sampling_values_at_the_limits_never_abort_other_streams(server, jobs, quiet) -> None:
    _check_class(server, jobs, quiet, _cases(server, SAMPLING_LIMITS))


def test_extreme_but_valid_sampling_gets_tokens(server) -> None:
    """`temperature: 1e-45` is greedy (TGI: 422 for 0, here a floor); the others are refused."""
    status, body = send(
        server.url,
        "POST",
        "/generate",
        json_body({"inputs": "x", "parameters": {"temperature": 1e-45, "max_new_tokens": 3}}),
    )
    assert status == 200 and "generated_text" in body
    status, body = send(
        server.url,
        "POST",
        "/v1/completions",
        json_body({"model": server.engine.model_name, "prompt": "x", "seed": 1 << 64}),
    )
    assert status == 400 and "seed" in body["error"]["message"]


def test_client_mistakes_are_4xx_never_5xx(server, jobs, quiet, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    cases = _cases(server, CLIENT_MISTAKES)
    cases.append(
        Hostile(
            "symlink loop",
            "/v1/load_lora_adapter",
            json_body({"lora_name": "loop", "lora_path": str(loop)}),
            frozenset({422}),
        )
    )
    _check_class(server, jobs, quiet, cases)


def test_bad_adapters_are_typed_4xx_and_never_ready(server, jobs, quiet, tiny_assets, tmp_path: Path) -> None:
    good = tiny_assets.adapters["llama"]["c16"]
    dirs = {name: str(build(good, tmp_path / name)) for name, (build, _, _) in BAD_ADAPTERS.items()}
    _check_class(server, jobs, quiet, _cases(server, set(), dirs), rounds=1)
    for name, (_, error_type, fragment) in BAD_ADAPTERS.items():
        status, _, info = call("GET", f"{server.url}/v1/adapters/bad-{name}")
        assert status == 200 and info["state"] == "failed", (name, info)
        assert info["error_type"] == error_type and fragment in info["error"], (name, info)


def test_a_maximum_size_request_keeps_the_probes_under_50ms(server, jobs, quiet) -> None:
    limit = body_limit(MAX_INPUT_TOKENS)
    biggest = json_body({"inputs": "the model serves " * ((limit - 100) // 17)})
    assert limit - 200 < len(biggest) <= limit
    probe = HealthProbe(server.url)
    streams = Streams(server.url, jobs)
    started = time.perf_counter()
    statuses: list[int] = []
    # At least 6 of them, and for long enough that the probes (every 20 ms) see them being handled.
    while len(statuses) < 6 or (len(probe.latencies_ms) < 10 and time.perf_counter() - started < 30):
        statuses.append(send(server.url, "POST", "/generate", biggest)[0])
    elapsed = time.perf_counter() - started
    streams.assert_unchanged(quiet)
    probe.stop()
    assert statuses == [422] * len(statuses)  # too many tokens: tokenised (off the loop), then refused
    assert set(probe.statuses) == {200}
    assert len(probe.latencies_ms) >= 10
    print(
        f"probes during max-size requests ({elapsed:.2f} s): max {probe.max_ms:.1f} ms, p95 {probe.percentile_ms(0.95):.1f} ms"
    )
    assert probe.percentile_ms(0.5) < 50  # the tail is the shared machine's (figures printed)


def test_a_body_that_cannot_fit_is_refused_before_it_is_read(server) -> None:
    limit = body_limit(MAX_INPUT_TOKENS)
    status, body = send(server.url, "POST", "/generate", b" " * (limit + 1))
    assert status == 413 and "MAX_INPUT_TOKENS" in body["error"]  # TGI routes: error_type per TGI's table
    status, body = send(server.url, "POST", "/v1/completions", b" " * (limit + 1))
    assert status == 413 and body["error"]["code"] == "payload_too_large"


def test_min_p_one_keeps_only_the_top_token(server) -> None:
    """vLLM's `min_p` reaches the sampler: at 1.0 only the most likely token survives (= greedy)."""
    body = {"model": server.engine.model_name, "prompt": "the model serves", "max_tokens": 8}
    _, greedy = send(server.url, "POST", "/v1/completions", json_body({**body, "temperature": 0}))
    status, sampled = send(
        server.url, "POST", "/v1/completions", json_body({**body, "temperature": 1.5, "min_p": 1.0})
    )
    assert status == 200 and sampled["choices"][0]["text"] == greedy["choices"][0]["text"]
