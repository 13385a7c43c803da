"""Schemathesis against the real server's `/openapi.json` (issue 15): zero 5xx, zero schema
violations, and the server still healthy after.

The document is the one the server serves, with the real model and adapter names filled in
(so generated requests reach the engine instead of stopping at 404) and token counts capped so
the run stays short. Every operation gets positive (schema-valid) and negative (schema-breaking)
cases; every response is checked for a server error, an undocumented status code, a content
type or a body the document does not allow.
"""

from __future__ import annotations

import copy
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from http_server_support import LiveServer, ServerThread, call, start_server
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from loraplex.server.app import ServerSettings
from loraplex.server.demo_assets import TinyAssets

pytestmark = pytest.mark.slow

EXAMPLES_PER_OPERATION = 25
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
MAX_TOKENS_FIELDS = ("max_new_tokens", "max_tokens", "max_completion_tokens")


@pytest.fixture(scope="module")
def fuzz_server(server_thread: ServerThread, tiny_assets: TinyAssets) -> Any:
    adapters = dict(tiny_assets.adapters["llama"])
    settings = ServerSettings(default_max_new_tokens=4)
    server = start_server(
        server_thread,
        tiny_assets,
        adapters,
        settings,
        max_input_tokens=64,
        max_total_tokens=72,
        max_concurrent_requests=64,
    )
    yield server
    server_thread.run(server.engine.shutdown(timeout_s=2.0))


def _fill_names(document: dict[str, Any], server: LiveServer, loop_path: Path) -> dict[str, Any]:
    """The served document, narrowed where free text would only ever meet a 404 or the network."""
    document = copy.deepcopy(document)
    schemas = document["components"]["schemas"]
    models = [server.engine.model_name, *server.adapters, "no-such-model"]
    adapter_dirs = [str(p) for p in server.adapters.values()]
    narrowed = {
        "model": {"enum": models},
        "adapter_id": {"anyOf": [{"enum": models}, {"type": "null"}]},
        "lora_name": {"enum": ["fuzz-adapter", "no-such-adapter"]},
        # Local paths only: hub ids and URLs would wait on a network this machine does not have.
        "lora_path": {"enum": [*adapter_dirs, "/nonexistent/adapter", str(loop_path), "/tmp/a\x00b"]},
    }
    for schema in schemas.values():
        properties = schema.get("properties", {})
        for name, replacement in narrowed.items():
            if name in properties:
                properties[name] = replacement
        for name in MAX_TOKENS_FIELDS:
            if name in properties:
                properties[name] = {
                    "anyOf": [{"type": "integer", "minimum": 1, "maximum": 4}, {"type": "null"}]
                }
    return document


def test_schemathesis_finds_no_server_error_and_no_schema_violation(
    fuzz_server: LiveServer, tmp_path: Path
) -> None:
    loop_path = tmp_path / "loop"
    loop_path.symlink_to(loop_path)
    status, _, document = call("GET", f"{fuzz_server.url}/openapi.json")
    assert status == 200
    schema = schemathesis.openapi.from_dict(_fill_names(document, fuzz_server, loop_path))
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, fuzz_server.url, statuses, failures)
    total = sum(statuses.values())
    print(f"schemathesis: {total} requests, statuses {dict(sorted(statuses.items()))}")
    assert not failures, "\n".join(failures[:10])
    assert total >= 10 * EXAMPLES_PER_OPERATION  # it really ran (GETs without parameters have one case)
    assert not [s for s in statuses if s >= 500]
    started = time.perf_counter()
    assert call("GET", f"{fuzz_server.url}/health")[0] == 200
    assert time.perf_counter() - started < 1.0
    assert call("GET", f"{fuzz_server.url}/ready")[0] == 200


def _fuzz_operation(operation: Any, mode: Any, url: str, statuses: Counter[int], failures: list[str]) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # failures are collected, not shrunk
    )
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        response = case.call(base_url=url, timeout=60)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=CHECKS)
        except (Exception, BaseExceptionGroup) as exc:  # collected: one run reports every failure
            body = response.text[:300]
            failures.append(
                f"{operation.label} [{mode.value}] {response.status_code}: {exc!s:.500} body={body}"
            )

    try:
        run()
    except Unsatisfiable:
        assert mode is schemathesis.GenerationMode.NEGATIVE  # nothing to break in a GET without parameters
    except Exception as exc:  # a case that could not even be generated or sent
        failures.append(f"{operation.label} [{mode.value}]: {json.dumps(str(exc))[:500]}")
