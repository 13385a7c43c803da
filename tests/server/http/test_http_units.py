"""Pure pieces of the HTTP layer: stop-text hold-back, adapter lists, auth, OpenAPI, JSON logs."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import pytest
from aiohttp import web

from loraplex.server.app import create_app
from loraplex.server.auth import is_authorized
from loraplex.server.engine_api import LoadAdapterSpec
from loraplex.server.openapi import ROUTES, build_openapi
from loraplex.server.routes.generation import StopTextFilter
from loraplex.server.serve_cli import (
    JsonFormatter,
    add_arguments,
    engine_config_kwargs,
    parse_lora_adapters,
    read_adapters_file,
)


def _run_filter(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    f = StopTextFilter(stops)
    out = [f.push(p) for p in pieces]
    out.append(f.flush())
    return out, f.stopped


def test_stop_filter_never_emits_the_stop_string_split_over_pieces() -> None:
    out, stopped = _run_filter(["END"], ["hello E", "N", "D more"])
    assert "".join(out) == "hello "
    assert stopped
    assert out[0] == "hello "  # "E" held back: it may begin the stop string


def test_stop_filter_releases_held_text_that_was_not_a_stop() -> None:
    out, stopped = _run_filter(["END"], ["EN", "x", "E"])
    assert "".join(out) == "ENxE"
    assert out[:2] == ["", "ENx"]
    assert not stopped


def test_stop_filter_picks_the_earliest_of_several_stops() -> None:
    out, _ = _run_filter(["world", "lo"], ["hello world"])
    assert "".join(out) == "hel"


def test_stop_filter_without_stops_passes_everything() -> None:
    out, stopped = _run_filter([], ["a", "b"])
    assert out == ["a", "b", ""] and not stopped


def test_parse_lora_adapters_forms() -> None:
    specs = parse_lora_adapters("org/a, org/b@v2,short=org/c@main,d=file:///x/y@z, hf=hf://org/e@r1")
    assert [(s.name, s.source, s.revision) for s in specs] == [
        ("org/a", "org/a", None),
        ("org/b", "org/b", "v2"),
        ("short", "org/c", "main"),
        ("d", "file:///x/y@z", None),  # URIs keep their own @rev syntax
        ("hf", "hf://org/e@r1", None),
    ]
    assert parse_lora_adapters("") == ()
    with pytest.raises(ValueError):
        parse_lora_adapters("name=")


def test_read_adapters_file_yaml_and_json(tmp_path: Path) -> None:
    yaml_file = tmp_path / "a.yaml"
    yaml_file.write_text("adapters:\n- name: a\n  source: org/a\n  aliases: [x]\n  pinned: true\n")
    json_file = tmp_path / "b.json"
    json_file.write_text(json.dumps([{"name": "b", "uri": "gs://bkt/b", "revision": "3"}]))
    assert read_adapters_file(yaml_file) == (LoadAdapterSpec("a", "org/a", aliases=("x",), pinned=True),)
    assert read_adapters_file(json_file) == (LoadAdapterSpec("b", "gs://bkt/b", revision="3"),)
    bad = tmp_path / "c.yaml"
    bad.write_text("- name: c\n")
    with pytest.raises(ValueError, match="source"):
        read_adapters_file(bad)


def test_is_authorized() -> None:
    assert is_authorized("Bearer s3cret", "s3cret")
    assert is_authorized("bearer s3cret", "s3cret")
    assert not is_authorized("Bearer s3cre", "s3cret")
    assert not is_authorized("Basic s3cret", "s3cret")
    assert not is_authorized(None, "s3cret")
    assert not is_authorized("Bearer ünïcode", "s3cret")


class _NoEngine:
    """Just enough for create_app to register routes (nothing is served)."""

    model_name = "m"
    tokenizer = None
    max_input_tokens = 16
    max_total_tokens = 64

    def stats(self) -> None:
        raise AssertionError("not scraped here")


def test_openapi_describes_exactly_the_registered_routes() -> None:
    app = create_app(_NoEngine())  # type: ignore[arg-type]
    registered = {
        (route.method.lower(), _plain_path(route.resource.canonical))
        for route in app.router.routes()
        if route.method != "HEAD" and isinstance(route.resource, web.Resource)
    }
    documented = {(r.method, r.path) for r in ROUTES}
    assert registered == documented
    document = build_openapi()
    assert document["openapi"].startswith("3.")
    schemas = document["components"]["schemas"]
    assert {
        "TGIGenerateRequest",
        "CompletionRequest",
        "ChatCompletionRequest",
        "LoadLoraAdapterRequest",
    } <= set(schemas)
    body = document["paths"]["/v1/load_lora_adapter"]["post"]["requestBody"]
    assert (
        body["content"]["application/json"]["schema"]["$ref"] == "#/components/schemas/LoadLoraAdapterRequest"
    )


def _plain_path(canonical: str) -> str:
    # "/v1/adapters/{name:.+}" is registered with a regex; the document names the variable only.
    return canonical.replace("{name:.+}", "{name}").replace("{model:.+}", "{model}")


def test_json_formatter_writes_one_object_with_extras() -> None:
    record = logging.LogRecord("loraplex.serve", logging.INFO, __file__, 1, "serving %s", ("now",), None)
    record.port = 8080
    entry = json.loads(JsonFormatter().format(record))
    assert entry["msg"] == "serving now"
    assert entry["level"] == "info" and entry["logger"] == "loraplex.serve"
    assert entry["port"] == 8080


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_serve_flags_read_their_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9000")
    monkeypatch.setenv("MAX_LORAS", "8")
    monkeypatch.setenv("MAX_BATCH_PREFILL_TOKENS", "4096")
    monkeypatch.setenv("CUDA_GRAPHS", "false")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("LORA_ADAPTERS", "org/a@v1")
    args = _parse(["--max-loras", "2"])  # a flag beats its variable
    assert (args.port, args.max_loras, args.cuda_graphs, args.api_key) == (9000, 2, False, "k")
    assert parse_lora_adapters(args.lora_adapters) == (LoadAdapterSpec("org/a", "org/a", revision="v1"),)
    kwargs = engine_config_kwargs(args, known_fields={"max_loras", "max_batch_tokens", "dtype"})
    assert kwargs == {"max_loras": 2, "max_batch_tokens": 4096, "dtype": "auto"}  # cuda_graphs: unknown here
    monkeypatch.setenv("CUDA_GRAPHS", "maybe")
    with pytest.raises(SystemExit):
        _parse([])
