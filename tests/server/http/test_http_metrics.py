"""/metrics as vLLM and TGI dashboards read it, and the Grafana dashboard in docs/ against a real scrape."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from http_server_support import PROMPTS, LiveServer, call
from prometheus_client.parser import text_string_to_metric_families

from loraplex.server.metrics import VLLM_REQUEST_LATENCY_BUCKETS, VLLM_TTFT_BUCKETS, build_1_2_5_buckets

DOCS = Path(__file__).resolve().parents[3] / "docs"
DASHBOARD = DOCS / "grafana" / "loraplex.json"

# vLLM's request-level series (vllm/v1/metrics/loggers.py) that inference-perf and the vLLM dashboards read.
VLLM_SERIES = (
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:request_queue_time_seconds_bucket",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:request_success_total",
    "vllm:num_preemptions_total",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:lora_requests_info",
)
TGI_SERIES = (
    "tgi_request_count_total",
    "tgi_request_success_total",
    "tgi_request_failure_total",
    "tgi_request_duration_bucket",
    "tgi_request_queue_duration_bucket",
    "tgi_request_input_length_bucket",
    "tgi_request_generated_tokens_bucket",
    "tgi_queue_size",
    "tgi_batch_current_size",
)
PROMQL_WORDS = {
    "sum", "rate", "irate", "increase", "by", "without", "histogram_quantile", "clamp_min", "max", "min",
    "avg", "count", "le", "label_values", "on", "ignoring", "group_left", "offset",
}  # fmt: skip


@pytest.fixture(scope="module")
def scrape(live_server: LiveServer) -> list:
    """A real scrape after real traffic: streamed and plain requests, an adapter, a refusal."""
    url = live_server.url
    call(
        "POST",
        f"{url}/generate",
        {"inputs": PROMPTS[0], "parameters": {"adapter_id": "a4", "max_new_tokens": 4}},
    )
    body = {"model": "b8", "prompt": PROMPTS[1], "max_tokens": 4, "n": 2, "temperature": 0}
    assert call("POST", f"{url}/v1/completions", body)[0] == 200
    call("POST", f"{url}/generate", {"inputs": "the model " * 700})  # refused: too long
    status, headers, text = call("GET", f"{url}/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    return list(text_string_to_metric_families(text))


def _samples(families: list) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in families:
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def test_vllm_and_tgi_series_exist_with_vllm_labels(scrape: list) -> None:
    samples = _samples(scrape)
    for name in VLLM_SERIES + TGI_SERIES:
        assert name in samples, name
    for name in VLLM_SERIES[:-1]:
        assert all(s.labels.get("model_name") == "tiny-llama" for s in samples[name]), name
    reasons = {s.labels["finished_reason"] for s in samples["vllm:request_success_total"]}
    assert reasons <= {"stop", "length", "abort"} and "length" in reasons
    assert sum(s.value for s in samples["vllm:request_queue_time_seconds_count"]) >= 3
    assert sum(s.value for s in samples["vllm:prefix_cache_queries_total"]) > 0


def test_bucket_edges_are_vllms(scrape: list) -> None:
    samples = _samples(scrape)

    def edges(name: str) -> list[float]:
        return [float(s.labels["le"]) for s in samples[name] if s.labels["le"] != "+Inf"]

    assert edges("vllm:time_to_first_token_seconds_bucket") == list(VLLM_TTFT_BUCKETS)
    assert edges("vllm:e2e_request_latency_seconds_bucket") == list(VLLM_REQUEST_LATENCY_BUCKETS)
    assert edges("vllm:request_prompt_tokens_bucket") == [float(b) for b in build_1_2_5_buckets(2048)]
    assert build_1_2_5_buckets(100) == (1, 2, 5, 10, 20, 50, 100)


def test_per_adapter_token_counters(scrape: list) -> None:
    samples = _samples(scrape)
    by_adapter = {s.labels["adapter"]: s.value for s in samples["loraplex_adapter_generation_tokens_total"]}
    assert by_adapter.get("a4", 0) >= 4 and by_adapter.get("b8", 0) >= 8


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dashboard["templating"]["list"] if v.get("type") == "query"]
    return exprs


def metric_names(expr: str) -> set[str]:
    """The series an expression reads: identifiers left once strings, label matchers, ranges,
    grouping clauses, variables and PromQL's own words are taken out."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"label_values\(([^,)]+),\s*\w+\s*\)", r"\1", expr)  # Grafana's (series, label)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\w+", " ", expr)
    names = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    return {n for n in names if n not in PROMQL_WORDS}


def test_metric_names_parser() -> None:
    expr = 'histogram_quantile(0.9, sum by (le) (rate(vllm:x_bucket{model_name=~"$m"}[$__rate_interval])))'
    assert metric_names(expr) == {"vllm:x_bucket"}
    assert metric_names("sum(rate(a_total[5m])) / clamp_min(sum(rate(b_total[5m])), 1)") == {
        "a_total",
        "b_total",
    }
    assert metric_names("label_values(vllm:y, model_name)") == {"vllm:y"}


def test_dashboard_reads_only_exported_series(scrape: list) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = set(_samples(scrape))
    read = set().union(*(metric_names(e) for e in _expressions(dashboard)))
    assert read, "no expressions parsed"
    assert read <= exported, sorted(read - exported)
    assert {"vllm:e2e_request_latency_seconds_bucket", "loraplex_adapter_generation_tokens_total"} <= read


def test_docs_describe_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    doc = (DOCS / "metrics.md").read_text()
    for panel in dashboard["panels"]:
        assert f"| {panel['title']} |" in doc, panel["title"]
        for target in panel["targets"]:
            for name in metric_names(target["expr"]):
                assert re.sub(r"_(bucket|sum|count|total)$", "", name) in doc, (panel["title"], name)
