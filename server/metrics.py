"""Prometheus metrics of one app: request histograms from the HTTP layer, engine gauges at scrape.

Each app owns a `CollectorRegistry`, so several apps (tests) never clash. The gauges GKE
Inference Gateway and vLLM-aware routers read keep vLLM's names and label shapes:
`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` (a 0..1
fraction, as vLLM reports it despite the name) and `vllm:lora_requests_info`, a gauge whose
value is the scrape time and whose labels carry comma-separated adapter names.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.server.engine_api import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")


class EngineStatsCollector(Collector):
    """Reads `engine.stats()` at scrape time, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = {"model_name": self._model_name}
        yield _gauge("vllm:num_requests_running", "Requests in the running batch.", stats.num_running, labels)
        yield _gauge(
            "vllm:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting, labels
        )
        yield _gauge("vllm:kv_cache_usage_perc", "KV-cache usage, 0..1.", stats.kv_cache_usage, labels)
        # The name vLLM used before v0.10, still the default of older Inference Gateway pickers.
        yield _gauge("vllm:gpu_cache_usage_perc", "KV-cache usage, 0..1.", stats.kv_cache_usage, labels)
        yield _gauge(
            "vllm:lora_requests_info",
            "Running and waiting adapters (labels); the value is the scrape time.",
            time.time(),
            {
                "max_lora": str(stats.max_loras),
                "running_lora_adapters": ",".join(stats.running_adapters),
                "waiting_lora_adapters": ",".join(stats.waiting_adapters),
            },
        )
        for key, value in sorted(stats.extra.items()):
            # Numeric extras (batch sizes, evictions, ...) surface without a change here.
            if isinstance(value, int | float) and not isinstance(value, bool):
                name = "loraplex_engine_" + _METRIC_NAME.sub("_", key)
                yield _gauge(name, f"Engine statistic `{key}`.", float(value), {})


def _gauge(name: str, documentation: str, value: float, labels: dict[str, str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


@dataclass
class TokenTotals:
    prompt: int = 0
    generated: int = 0


class Metrics:
    """The HTTP layer's own counters and histograms, plus the engine collector."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self.registry = CollectorRegistry()
        self._add_request_metrics(self.registry)
        self._add_token_metrics(self.registry)
        self._add_adapter_metrics(self.registry)
        self.registry.register(EngineStatsCollector(stats, model_name))

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        self.http_requests = Counter(
            "loraplex_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "loraplex_request_duration_seconds",
            "Generation request latency, arrival to last token.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("loraplex_requests_in_flight", "Generation requests being served.", registry=r)
        self.rejected = Counter(
            "loraplex_requests_rejected",
            "Requests refused before generation, by error type.",
            ["error_type"],
            registry=r,
        )

    def _add_token_metrics(self, r: CollectorRegistry) -> None:
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated.", registry=r)
        self.prompt_length = Histogram(
            "loraplex_request_prompt_tokens", "Prompt length per request.", buckets=_TOKEN_BUCKETS, registry=r
        )
        self.generation_length = Histogram(
            "loraplex_request_generation_tokens",
            "Generated tokens per request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )

    def _add_adapter_metrics(self, r: CollectorRegistry) -> None:
        self.adapter_requests = Counter(
            "loraplex_adapter_requests",
            'Finished generation requests per adapter (adapter="" is the base model) and finish reason.',
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.adapter_loads = Counter(
            "loraplex_adapter_loads", "Adapter load calls by result.", ["result"], registry=r
        )
        self.adapter_unloads = Counter(
            "loraplex_adapter_unloads", "Adapter unload calls by result.", ["result"], registry=r
        )
        # Charge-back per team: one series per served adapter name (adapter="" is the base model).
        self.adapter_prompt_tokens = Counter(
            "loraplex_adapter_prompt_tokens", "Prompt tokens processed per adapter.", ["adapter"], registry=r
        )
        self.adapter_generation_tokens = Counter(
            "loraplex_adapter_generation_tokens", "Tokens generated per adapter.", ["adapter"], registry=r
        )
        self.tokens_by_adapter: dict[str, TokenTotals] = {}

    def count_tokens(self, adapter: str | None, prompt: int, generated: int) -> None:
        """Per-adapter totals, both in /metrics and for `GET /v1/adapters` (the operator sums them)."""
        name = adapter or ""
        self.adapter_prompt_tokens.labels(name).inc(prompt)
        self.adapter_generation_tokens.labels(name).inc(generated)
        totals = self.tokens_by_adapter.setdefault(name, TokenTotals())
        totals.prompt += prompt
        totals.generated += generated

    def render(self) -> bytes:
        return generate_latest(self.registry)
