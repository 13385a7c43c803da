"""Helpers of the hostile-input tests: streams that run beside the bad requests, a /health probe,
and the catalogue of bad requests (issue 15).

A `Streams` run sends greedy TGI streams from worker threads while a test fires its hostile
requests; their token ids are compared with the same streams run quietly, one at a time.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from http_server_support import PROMPTS

# The broken-adapter builders live with the adapter tests; share them instead of copying them.
sys.path.append(str(Path(__file__).resolve().parents[1] / "adapters"))
from adapter_cases import BAD_ADAPTERS as BAD_ADAPTERS

STREAM_TOKENS = 16


def stream_tokens(
    url: str, adapter: str | None, prompt: str, max_new_tokens: int = STREAM_TOKENS
) -> list[int]:
    """One greedy `/generate_stream`; the token ids it streamed (an error event raises)."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    body = {"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": max_new_tokens}}
    connection.request("POST", "/generate_stream", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    if response.status != 200:
        raise AssertionError(f"stream answered {response.status}: {response.read()[:200]!r}")
    ids = []
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        event = json.loads(line[5:])
        if "error" in event:
            raise AssertionError(f"stream ended with an error event: {event}")
        ids.append(event["token"]["id"])
    connection.close()
    return ids


def stream_jobs(adapters: list[str | None], count: int) -> list[tuple[str | None, str]]:
    return [(adapters[i % len(adapters)], PROMPTS[i % len(PROMPTS)]) for i in range(count)]


def quiet_tokens(url: str, jobs: list[tuple[str | None, str]]) -> dict[tuple[str | None, str], list[int]]:
    """Each distinct job once, alone."""
    return {job: stream_tokens(url, *job) for job in dict.fromkeys(jobs)}


class Streams:
    """`jobs` streamed concurrently in threads; `join()` returns their token ids in job order."""

    def __init__(self, url: str, jobs: list[tuple[str | None, str]]) -> None:
        self.jobs = jobs
        self._pool = ThreadPoolExecutor(len(jobs))
        self._futures = [self._pool.submit(stream_tokens, url, *job) for job in jobs]

    def join(self) -> list[list[int]]:
        try:
            return [f.result(timeout=300) for f in self._futures]
        finally:
            self._pool.shutdown()

    def assert_unchanged(self, quiet: dict[tuple[str | None, str], list[int]]) -> None:
        for job, got in zip(self.jobs, self.join(), strict=True):
            assert got == quiet[job], job


@dataclass
class HealthProbe:
    """Polls /health (and /ready) every `period_s` in a thread; latencies in milliseconds."""

    url: str
    period_s: float = 0.02
    latencies_ms: list[float] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        parsed = urlparse(self.url)
        paths = ("/health", "/ready")
        i = 0
        while not self._stop.is_set():
            connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=30)
            started = time.perf_counter()
            connection.request("GET", paths[i % 2])
            response = connection.getresponse()
            response.read()
            self.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.statuses.append(response.status)
            connection.close()
            i += 1
            self._stop.wait(self.period_s)

    def stop(self) -> HealthProbe:
        self._stop.set()
        self._thread.join(30)
        return self

    @property
    def max_ms(self) -> float:
        return max(self.latencies_ms)

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def send(
    url: str, method: str, path: str, body: bytes | None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One raw request (bytes exactly as given); (status, parsed JSON body or text)."""
    parsed = urlparse(url)
    connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        connection.request(method, path, body, all_headers)
        response = connection.getresponse()
        raw = response.read()
    except (ConnectionError, http.client.HTTPException) as exc:  # e.g. refused mid-upload (413)
        return 413 if "Broken pipe" in str(exc) or "reset" in str(exc) else 599, str(exc)
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except ValueError:
        return response.status, raw.decode(errors="replace")


def json_body(value: Any) -> bytes:
    return json.dumps(value).encode()


def nested(depth: int) -> bytes:
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


@dataclass(frozen=True)
class Hostile:
    """A bad request and the statuses it may get (never a 5xx)."""

    name: str
    path: str
    body: bytes
    statuses: frozenset[int]
    method: str = "POST"

    def send(self, url: str) -> int:
        status, _ = send(url, self.method, self.path, self.body)
        return status


def hostile_requests(
    model: str, adapter: str, bad_adapter_dirs: dict[str, str], body_limit: int
) -> list[Hostile]:
    """One of each class of the issue: limits, malformed JSON, huge bodies, bad adapters."""
    gen = "/generate"

    def tgi(**parameters: Any) -> bytes:
        return json_body({"inputs": "the model serves", "parameters": {"max_new_tokens": 4, **parameters}})

    def oai(**fields: Any) -> bytes:
        return json_body({"model": model, "prompt": "the model", "max_tokens": 4, **fields})

    ok_or_422 = frozenset({200, 422})
    cases = [
        Hostile("tiny temperature", gen, tgi(temperature=1e-45), ok_or_422),
        Hostile("huge temperature", gen, tgi(temperature=1e308, do_sample=True), ok_or_422),
        Hostile("seed 2**64", "/v1/completions", oai(seed=1 << 64), frozenset({400})),  # OpenAI's 422
        Hostile("seed 2**64 tgi", gen, tgi(seed=1 << 64, do_sample=True), frozenset({422})),
        Hostile("tiny top_p", gen, tgi(top_p=1e-300, do_sample=True), ok_or_422),
        Hostile("huge repetition penalty", gen, tgi(repetition_penalty=1e308), frozenset({422})),
        Hostile("tiny repetition penalty", gen, tgi(repetition_penalty=1e-300), ok_or_422),
        Hostile(
            "NaN temperature", gen, b'{"inputs": "x", "parameters": {"temperature": NaN}}', frozenset({422})
        ),
        Hostile(
            "Infinity penalty",
            gen,
            b'{"inputs": "x", "parameters": {"repetition_penalty": Infinity}}',
            frozenset({422}),
        ),
        Hostile(
            "5000-digit integer",
            gen,
            b'{"inputs": "x", "parameters": {"seed": ' + b"9" * 5000 + b"}}",
            frozenset({422}),
        ),
        Hostile("JSON nested 100k deep", gen, nested(100_000), frozenset({413, 422})),
        Hostile("truncated JSON", gen, b'{"inputs": "x", "param', frozenset({422})),
        Hostile("not UTF-8", gen, b'{"inputs": "\xff\xfe"}', frozenset({422})),
        Hostile(
            "lone surrogate in chat",
            "/v1/chat/completions",
            b'{"model": "'
            + model.encode()
            + b'", "messages": [{"role": "user", "content": "\\ud800"}], "max_tokens": 4}',
            frozenset({400}),
        ),
        Hostile(
            "lone surrogate prompt",
            gen,
            b'{"inputs": "a\\udfffb", "parameters": {"max_new_tokens": 2}}',
            frozenset({422}),
        ),
        Hostile("body over the limit", gen, json_body({"inputs": "x" * (body_limit + 10)}), frozenset({413})),
        Hostile(
            "prompt too long",
            gen,
            json_body({"inputs": "the model serves " * (body_limit // 40)}),
            frozenset({422}),
        ),
        Hostile("huge max_new_tokens", gen, tgi(max_new_tokens=10**30), frozenset({422})),
        Hostile("huge top_k", "/v1/completions", oai(top_k=10**30), frozenset({200, 400})),
        Hostile("unknown adapter", gen, tgi(adapter_id="no-such-adapter"), frozenset({404})),
        Hostile(
            "lora_path with NUL",
            "/v1/load_lora_adapter",
            json_body({"lora_name": "bad-nul", "lora_path": "/tmp/a\x00b"}),
            frozenset({422}),
        ),
    ]
    for name, directory in bad_adapter_dirs.items():
        body = json_body({"lora_name": f"bad-{name}", "lora_path": directory})
        cases.append(
            Hostile(f"adapter: {name}", "/v1/load_lora_adapter", body, frozenset({404, 409, 413, 422}))
        )
    return cases


def run_hostile(url: str, cases: list[Hostile], rounds: int, workers: int = 4) -> list[tuple[str, int]]:
    """`rounds` passes over `cases`, a few at a time; (name, status) of each request."""
    work = [case for _ in range(rounds) for case in cases]
    with ThreadPoolExecutor(workers) as pool:
        statuses = list(pool.map(lambda c: c.send(url), work))
    return [(case.name, status) for case, status in zip(work, statuses, strict=True)]


def unexpected(results: list[tuple[str, int]], cases: list[Hostile]) -> list[tuple[str, int]]:
    allowed: dict[str, frozenset[int]] = {case.name: case.statuses for case in cases}
    return [(name, status) for name, status in results if status not in allowed[name]]


_PROBE_SCRIPT = r"""
import http.client, json, sys, threading, time
host, port = sys.argv[1], int(sys.argv[2])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
latencies, statuses, i = [], [], 0
while not stop.is_set():
    connection = http.client.HTTPConnection(host, port, timeout=30)
    started = time.perf_counter()
    connection.request("GET", ("/health", "/ready")[i % 2])
    response = connection.getresponse()
    response.read()
    latencies.append((time.perf_counter() - started) * 1000)
    statuses.append(response.status)
    connection.close()
    i += 1
    stop.wait(0.02)
print(json.dumps({"latencies_ms": latencies, "statuses": statuses}))
"""


class ProbeProcess(HealthProbe):
    """`HealthProbe` from its own process, so the test's client threads (same GIL) don't slow it."""

    def __post_init__(self) -> None:
        parsed = urlparse(self.url)
        self._process = subprocess.Popen(
            [sys.executable, "-c", _PROBE_SCRIPT, str(parsed.hostname), str(parsed.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def stop(self) -> HealthProbe:
        out, _ = self._process.communicate("", timeout=60)
        result = json.loads(out)
        self.latencies_ms, self.statuses = result["latencies_ms"], result["statuses"]
        return self
