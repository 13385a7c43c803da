"""Prometheus metrics of one app: request histograms from the HTTP layer, engine gauges at scrape.

Each app owns a `CollectorRegistry`, so several apps (tests) never clash. Three families, fed
by the same call sites (`_Tee`), so that existing dashboards work unchanged:
- `vllm:*` with vLLM's names, `model_name` (and `engine`) labels and bucket edges
  (vllm/v1/metrics/loggers.py): request latency, TTFT, inter-token latency, queue time, token
  counters and histograms, `request_success{finished_reason}`, preemptions, prefix-cache
  queries/hits, and the gauges GKE Inference Gateway reads (`num_requests_running`,
  `num_requests_waiting`, `kv_cache_usage_perc` as a 0..1 fraction, `lora_requests_info`, a
  gauge whose value is the scrape time and whose labels carry comma-separated adapter names);
- `tgi_*`, TGI's router names where one exists;
- `loraplex_*`, ours, including the per-adapter token counters (`adapter` label) for charge-back.
docs/metrics.md lists them all; docs/grafana/loraplex.json reads only these.
"""

from __future__ import annotations

import re
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from loraplex.server.engine_api import EngineStats

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_METRIC_NAME = re.compile(r"[^a-zA-Z0-9_]")
# vLLM's bucket edges (vllm/v1/metrics/loggers.py)
VLLM_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                     20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
VLLM_TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                     40.0, 80.0)  # fmt: skip
VLLM_REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                                120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
# vLLM's FinishReason names for `request_success{finished_reason}`; errors are not successes.
_VLLM_FINISH = {"length": "length", "eos_token": "stop", "stop_sequence": "stop", "cancelled": "abort"}


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count histogram edges)."""
    edges, exponent = [], 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(edges)
            edges.append(value)
        exponent += 1


class _Tee:
    """One call site feeding several series (a loraplex_ one and its vllm:/tgi_ twins)."""

    def __init__(self, *children: Any) -> None:
        self._children = [c for c in children if c is not None]

    def inc(self, amount: float = 1.0) -> None:
        for child in self._children:
            child.inc(amount)

    def dec(self, amount: float = 1.0) -> None:
        for child in self._children:
            child.dec(amount)

    def observe(self, value: float) -> None:
        for child in self._children:
            child.observe(value)


class _Labelled:
    """`.labels(...)` of a loraplex_ series, teeing to twins chosen from the same label values."""

    def __init__(self, own: Any, twins: Callable[..., list[Any]]) -> None:
        self._own, self._twins = own, twins

    def labels(self, *values: str) -> _Tee:
        return _Tee(self._own.labels(*values), *self._twins(*values))


class EngineStatsCollector(Collector):
    """Reads `engine.stats()` at scrape time, so the gauges are never stale."""

    def __init__(self, stats: Callable[[], EngineStats], model_name: str) -> None:
        self._stats = stats
        self._model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        labels = {"model_name": self._model_name, "engine": "0"}
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
        yield from _engine_counters(stats, labels)
        yield _gauge("tgi_queue_size", "Requests waiting to be scheduled.", stats.num_waiting, {})
        yield _gauge("tgi_batch_current_size", "Requests in the running batch.", stats.num_running, {})
        for key, value in sorted(stats.extra.items()):
            # Numeric extras (batch sizes, evictions, ...) surface without a change here.
            if isinstance(value, int | float) and not isinstance(value, bool):
                name = "loraplex_engine_" + _METRIC_NAME.sub("_", key)
                yield _gauge(name, f"Engine statistic `{key}`.", float(value), {})


def _engine_counters(stats: EngineStats, labels: dict[str, str]) -> Iterator[Metric]:
    """vLLM's engine counters, read from the engine's lifetime totals."""
    extra = stats.extra
    for name, key, documentation in (
        ("vllm:num_preemptions", "num_preemptions", "Cumulative number of preemptions from the engine."),
        ("vllm:prefix_cache_queries", "num_prefix_query_tokens", "Prefix cache queries, in queried tokens."),
        ("vllm:prefix_cache_hits", "num_prefix_hit_tokens", "Prefix cache hits, in cached tokens."),
    ):
        if isinstance(extra.get(key), int | float):
            family = CounterMetricFamily(name, documentation, labels=list(labels))
            family.add_metric(list(labels.values()), float(extra[key]))
            yield family


def _gauge(name: str, documentation: str, value: float, labels: dict[str, str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    family.add_metric(list(labels.values()), float(value))
    return family


class _Counted:
    """Adapts a counter to an `observe` call site: one observation, one count."""

    def __init__(self, counter: Any) -> None:
        self._counter = counter

    def observe(self, _: float) -> None:
        self._counter.inc()


@dataclass
class TokenTotals:
    prompt: int = 0
    generated: int = 0


class Metrics:
    """The HTTP layer's own counters and histograms, their vLLM/TGI twins, plus the engine collector.

    The attributes the routes call (`time_to_first_token.observe`, `adapter_requests.labels(...)
    .inc()`, ...) feed all three families at once.
    """

    def __init__(self, stats: Callable[[], EngineStats], model_name: str, max_model_len: int = 2048) -> None:
        self.registry = CollectorRegistry()
        self._labels = (model_name, "0")  # vLLM's model_name and engine labels
        self._add_vllm_metrics(self.registry, max_model_len)
        self._add_tgi_metrics(self.registry)
        self._add_request_metrics(self.registry)
        self._add_token_metrics(self.registry)
        self._add_adapter_metrics(self.registry)
        self.registry.register(EngineStatsCollector(stats, model_name))
        self._queued: weakref.WeakSet[Any] = weakref.WeakSet()

    def _vllm_histogram(self, r: CollectorRegistry, name: str, doc: str, buckets: tuple[float, ...]) -> Any:
        family = Histogram(name, doc, ["model_name", "engine"], buckets=buckets, registry=r)
        return family.labels(*self._labels)

    def _add_vllm_metrics(self, r: CollectorRegistry, max_model_len: int) -> None:
        h, tokens = self._vllm_histogram, build_1_2_5_buckets(max_model_len)
        self.vllm_e2e = h(r, "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
                          VLLM_REQUEST_LATENCY_BUCKETS)  # fmt: skip
        self.vllm_queue = h(r, "vllm:request_queue_time_seconds",
                            "Histogram of time spent in WAITING phase for request.", VLLM_REQUEST_LATENCY_BUCKETS)  # fmt: skip
        self.vllm_ttft = h(r, "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                           VLLM_TTFT_BUCKETS)  # fmt: skip
        self.vllm_itl = h(r, "vllm:inter_token_latency_seconds", "Histogram of inter-token latency in seconds.",
                          VLLM_TPOT_BUCKETS)  # fmt: skip
        self.vllm_tpot = h(r, "vllm:time_per_output_token_seconds",
                           "Histogram of time per output token in seconds (each interval, as vLLM v0).",
                           VLLM_TPOT_BUCKETS)  # fmt: skip
        self.vllm_prompt_length = h(
            r, "vllm:request_prompt_tokens", "Number of prefill tokens processed.", tokens
        )
        self.vllm_generation_length = h(r, "vllm:request_generation_tokens",
                                        "Number of generation tokens processed.", tokens)  # fmt: skip
        labels = ["model_name", "engine"]
        self.vllm_prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", labels,
                                          registry=r).labels(*self._labels)  # fmt: skip
        self.vllm_generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.",
                                              labels, registry=r).labels(*self._labels)  # fmt: skip
        self.vllm_success = Counter("vllm:request_success", "Count of successfully processed requests.",
                                    [*labels, "finished_reason"], registry=r)  # fmt: skip

    def _add_tgi_metrics(self, r: CollectorRegistry) -> None:
        self.tgi_count = Counter("tgi_request_count", "Requests received (admitted or refused).", registry=r)
        self.tgi_success = Counter("tgi_request_success", "Requests that finished without error.", registry=r)
        self.tgi_failure = Counter(
            "tgi_request_failure", "Requests that failed, by error.", ["err"], registry=r
        )
        self.tgi_duration = Histogram("tgi_request_duration", "Request latency in seconds.",
                                      buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tgi_queue = Histogram("tgi_request_queue_duration", "Time in the queue in seconds.",
                                   buckets=_LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.tgi_input_length = Histogram("tgi_request_input_length", "Prompt tokens per request.",
                                          buckets=_TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.tgi_generated = Histogram("tgi_request_generated_tokens", "Generated tokens per request.",
                                       buckets=_TOKEN_BUCKETS, registry=r)  # fmt: skip

    def _finished_twins(self, adapter: str, finish: str) -> list[Any]:
        reason = _VLLM_FINISH.get(finish)
        vllm = self.vllm_success.labels(*self._labels, reason) if reason else None
        tgi = self.tgi_failure.labels(finish) if finish == "error" else self.tgi_success
        return [vllm, tgi]

    def _add_request_metrics(self, r: CollectorRegistry) -> None:
        self.http_requests = Counter(
            "loraplex_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=r
        )
        own_duration = Histogram(
            "loraplex_request_duration_seconds",
            "Generation request latency, arrival to last token.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.request_duration = _Labelled(own_duration, lambda route: [self.vllm_e2e, self.tgi_duration])
        own_ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Arrival to first token.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = _Tee(own_ttft, self.vllm_ttft)
        own_itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between consecutive output tokens.",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = _Tee(own_itl, self.vllm_itl, self.vllm_tpot)
        self.in_flight = Gauge("loraplex_requests_in_flight", "Generation requests being served.", registry=r)
        own_rejected = Counter(
            "loraplex_requests_rejected",
            "Requests refused before generation, by error type.",
            ["error_type"],
            registry=r,
        )
        self.rejected = _Labelled(
            own_rejected, lambda error: [self.tgi_failure.labels(error), self.tgi_count]
        )

    def _add_token_metrics(self, r: CollectorRegistry) -> None:
        own_prompt = Counter("loraplex_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.prompt_tokens = _Tee(own_prompt, self.vllm_prompt_tokens)
        own_generated = Counter("loraplex_generation_tokens", "Tokens generated.", registry=r)
        self.generation_tokens = _Tee(own_generated, self.vllm_generation_tokens)
        own_prompt_length = Histogram(
            "loraplex_request_prompt_tokens", "Prompt length per request.", buckets=_TOKEN_BUCKETS, registry=r
        )
        # observed once per admitted request: also counts it for TGI
        self.prompt_length = _Tee(
            own_prompt_length, self.vllm_prompt_length, self.tgi_input_length, _Counted(self.tgi_count)
        )
        own_generation_length = Histogram(
            "loraplex_request_generation_tokens",
            "Generated tokens per request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.generation_length = _Tee(own_generation_length, self.vllm_generation_length, self.tgi_generated)

    def _add_adapter_metrics(self, r: CollectorRegistry) -> None:
        own_requests = Counter(
            "loraplex_adapter_requests",
            'Finished generation requests per adapter (adapter="" is the base model) and finish reason.',
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.adapter_requests = _Labelled(own_requests, self._finished_twins)
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

    def watch_engine(self, engine: Any) -> None:
        """Queue time needs the engine's view: the first step that schedules a sequence ends its wait."""
        observe_steps = getattr(engine, "observe_steps", None)
        if observe_steps is not None:
            observe_steps(self._on_step)

    def _on_step(self, step: Any) -> None:
        """Engine thread: every step's plan (`ScheduledStep`); sequences seen for the first time."""
        now = time.monotonic()
        for seq, _ in step.chunks:
            if seq not in self._queued:
                self._queued.add(seq)
                waited = max(0.0, now - seq.arrival)
                self.vllm_queue.observe(waited)
                self.tgi_queue.observe(waited)

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
