"""Bounded load through the real HTTP stack: 200 concurrent streams, queue limits, disconnects, /metrics."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp
from http_server_support import PROMPTS, LiveServer, Reference, ServerThread, call, start_server
from prometheus_client.parser import text_string_to_metric_families

MAX_NEW = 6
NUM_REQUESTS = 200


async def _tgi_stream(session: aiohttp.ClientSession, url: str, adapter: str, prompt: str) -> tuple[int, Any]:
    body = {"inputs": prompt, "parameters": {"adapter_id": adapter, "max_new_tokens": MAX_NEW}}
    async with session.post(f"{url}/generate_stream", json=body) as response:
        if response.status != 200:
            return response.status, (await response.json(), response.headers.get("Retry-After"))
        final = None
        async for line in response.content:
            if line.startswith(b"data:"):
                event = json.loads(line[5:])
                assert "error" not in event, event
                if event["generated_text"] is not None:
                    final = event["generated_text"]
        return 200, final


async def _openai_stream(
    session: aiohttp.ClientSession, url: str, adapter: str, prompt: str
) -> tuple[int, Any]:
    body = {"model": adapter, "prompt": prompt, "max_tokens": MAX_NEW, "temperature": 0, "stream": True}
    async with session.post(f"{url}/v1/completions", json=body) as response:
        if response.status != 200:
            return response.status, await response.json()
        text, done = [], False
        async for line in response.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data:"):
                text.append(json.loads(line[5:])["choices"][0]["text"])
        return 200, "".join(text) if done else None


def _samples(metrics_text: str, name: str) -> list[Any]:
    return [
        s for family in text_string_to_metric_families(metrics_text) for s in family.samples if s.name == name
    ]


async def _scrape_running_adapters(
    session: aiohttp.ClientSession, url: str, stop: asyncio.Event
) -> list[set[str]]:
    seen = []
    while not stop.is_set():
        async with session.get(f"{url}/metrics") as response:
            text = await response.text()
        (info,) = _samples(text, "vllm:lora_requests_info")
        running = info.labels["running_lora_adapters"]
        seen.append(set(running.split(",")) if running else set())
        await asyncio.sleep(0.01)
    return seen


async def test_200_concurrent_streams_over_five_adapters(
    live_server: LiveServer, reference: Reference
) -> None:
    names = sorted(live_server.adapters)
    jobs = [(names[i % len(names)], PROMPTS[i % len(PROMPTS)], i % 4 == 0) for i in range(NUM_REQUESTS)]
    expected = {(a, p): reference.text(a, p, MAX_NEW) for a in names for p in PROMPTS}
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=180)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        scraper = asyncio.create_task(_scrape_running_adapters(session, live_server.url, stop))
        started = time.perf_counter()
        results = await asyncio.gather(
            *((_openai_stream if oai else _tgi_stream)(session, live_server.url, a, p) for a, p, oai in jobs)
        )
        elapsed = time.perf_counter() - started
        stop.set()
        seen = await scraper
    assert [r[0] for r in results] == [200] * NUM_REQUESTS
    wrong = [(job, got) for job, (_, got) in zip(jobs, results, strict=True) if got != expected[job[:2]]]
    assert not wrong, wrong[:3]
    named = set().union(*seen)
    assert named, "vllm:lora_requests_info never named a running adapter during the load"
    assert named <= set(names)
    max_loras = live_server.engine.stats().max_loras
    assert all(len(s) <= max_loras for s in seen)
    _, _, text = call("GET", f"{live_server.url}/metrics")
    served: dict[str, float] = {}
    for sample in _samples(text, "loraplex_adapter_requests_total"):
        served[sample.labels["adapter"]] = served.get(sample.labels["adapter"], 0) + sample.value
    assert all(served.get(name, 0) >= NUM_REQUESTS // len(names) for name in names), served
    assert elapsed < 120


def test_metrics_parse_and_carry_vllm_gauges(live_server: LiveServer) -> None:
    status, headers, text = call("GET", f"{live_server.url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc")
    for name in (*gauges, "vllm:gpu_cache_usage_perc"):
        (sample,) = families[name].samples
        assert sample.labels == {"model_name": "tiny-llama", "engine": "0"}  # vLLM v1's label set
    (info,) = families["vllm:lora_requests_info"].samples
    assert info.labels["max_lora"] == str(live_server.engine.stats().max_loras)
    assert set(info.labels) == {"max_lora", "running_lora_adapters", "waiting_lora_adapters"}
    assert abs(info.value - time.time()) < 60
    assert "loraplex_time_to_first_token_seconds" in families
    assert "loraplex_request_duration_seconds" in families


async def _wait_idle(server: LiveServer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = server.engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"engine still busy: {server.engine.stats()}")


def _cancelled(server: LiveServer, adapter: str) -> float:
    _, _, text = call("GET", f"{server.url}/metrics")
    samples = _samples(text, "loraplex_adapter_requests_total")
    return sum(s.value for s in samples if s.labels == {"adapter": adapter, "finish_reason": "cancelled"})


LONG = {"model": "b8", "prompt": "the model serves", "max_tokens": 1500, "ignore_eos": True}


async def test_client_disconnect_cancels_a_stream(live_server: LiveServer) -> None:
    before = _cancelled(live_server, "b8")
    async with aiohttp.ClientSession() as session:
        response = await session.post(f"{live_server.url}/v1/completions", json={**LONG, "stream": True})
        assert response.status == 200
        first = await response.content.readline()
        assert first.startswith(b"data:")
        response.close()  # hang up mid-stream
    await _wait_idle(live_server)
    assert _cancelled(live_server, "b8") == before + 1


async def test_client_timeout_cancels_a_non_streamed_request(live_server: LiveServer) -> None:
    before = _cancelled(live_server, "b8")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=0.3)) as session:
        try:
            async with session.post(f"{live_server.url}/v1/completions", json=LONG) as response:
                await response.read()
            raise AssertionError("a 1500-token request finished within 0.3 s")
        except TimeoutError:
            pass
    await _wait_idle(live_server)
    deadline = time.monotonic() + 5
    while _cancelled(live_server, "b8") != before + 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert _cancelled(live_server, "b8") == before + 1


async def test_queue_limit_gives_429_and_server_stays_healthy(
    server_thread: ServerThread, tiny_assets, reference: Reference
) -> None:
    adapters = {"a4": tiny_assets.adapters["llama"]["a4"]}
    server = await asyncio.to_thread(
        start_server, server_thread, tiny_assets, adapters, max_concurrent_requests=4
    )
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            results = await asyncio.gather(
                *(_tgi_stream(session, server.url, "a4", PROMPTS[0]) for _ in range(60))
            )
            statuses = [status for status, _ in results]
            assert statuses.count(429) > 0 and statuses.count(200) >= 4, statuses
            expected = reference.text("a4", PROMPTS[0], MAX_NEW)
            for status, result in results:
                if status == 200:
                    assert result == expected
                else:
                    body, retry_after = result
                    assert status == 429 and body["error_type"] == "overloaded"
                    assert int(retry_after) >= 1
            await _wait_idle(server)
            assert call("GET", f"{server.url}/health")[0] == 200
            assert await _tgi_stream(session, server.url, "a4", PROMPTS[0]) == (200, expected)
        _, _, text = call("GET", f"{server.url}/metrics")
        (rejected,) = _samples(text, "loraplex_requests_rejected_total")
        assert rejected.labels == {"error_type": "overloaded"} and rejected.value == statuses.count(429)
    finally:
        await asyncio.wrap_future(
            asyncio.run_coroutine_threadsafe(server.engine.shutdown(timeout_s=2.0), server_thread.loop)
        )
