"""Adapter admin API: list, inspect, hot-load with aliases, unload (then 404, never the base)."""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from http_server_support import LiveServer, Reference, ServerThread, call

from loraplex.server.app import ServerSettings, create_app
from loraplex.server.async_engine import AsyncEngine, load_local_adapter
from loraplex.server.engine import EngineConfig
from loraplex.server.engine_api import AdapterInfo, LoadAdapterSpec

FIELDS = {f.name for f in dataclasses.fields(AdapterInfo)} | {"access"}  # + what the HTTP layer knows


def _generate(server: LiveServer, adapter: str | None) -> tuple[int, dict]:
    body = {"inputs": "the model serves", "parameters": {"adapter_id": adapter, "max_new_tokens": 6}}
    status, _, out = call("POST", f"{server.url}/generate", body)
    return status, out


def test_list_and_get_adapters(live_server: LiveServer) -> None:
    status, _, out = call("GET", f"{live_server.url}/v1/adapters")
    assert status == 200 and out["object"] == "list"
    by_name = {a["name"]: a for a in out["data"] if a["state"] != "failed"}
    assert set(by_name) == set(live_server.adapters)
    for name, info in by_name.items():
        assert set(info) == FIELDS  # every AdapterInfo field, snake_case
        assert info["state"] == "ready"
        assert info["source"] == str(live_server.adapters[name])
    assert by_name["b8"]["rank"] == 8 and by_name["c16"]["rank"] == 16
    status, _, one = call("GET", f"{live_server.url}/v1/adapters/c16")
    assert status == 200 and one["name"] == "c16" and one["rank"] == 16


def test_get_unknown_adapter_is_404(live_server: LiveServer) -> None:
    status, _, out = call("GET", f"{live_server.url}/v1/adapters/nope")
    assert status == 404
    assert out["error_type"] == "adapter_not_found"


def test_hot_load_alias_then_unload(live_server: LiveServer, reference: Reference, tiny_assets) -> None:
    url = live_server.url
    body = {
        "lora_name": "team/zed",
        "lora_path": str(tiny_assets.adapters["llama"]["b8"]),
        "aliases": ["zed"],
    }
    status, _, info = call("POST", f"{url}/v1/load_lora_adapter", body)
    assert status == 200, info
    assert set(info) == FIELDS
    assert (info["name"], info["state"], info["rank"], info["aliases"]) == ("team/zed", "ready", 8, ["zed"])
    try:
        expected = reference.text("b8", "the model serves", 6)  # same weights as b8
        for name in ("team/zed", "zed"):
            status, out = _generate(live_server, name)
            assert (status, out["generated_text"]) == (200, expected)
        assert call("GET", f"{url}/v1/adapters/team/zed")[2]["name"] == "team/zed"
        assert "team/zed" in {m["id"] for m in call("GET", f"{url}/v1/models")[2]["data"]}
    finally:
        status, _, out = call("POST", f"{url}/v1/unload_lora_adapter", {"lora_name": "team/zed"})
    assert status == 200 and out == {"lora_name": "team/zed", "unloaded": True}
    for name in ("team/zed", "zed"):
        status, out = _generate(live_server, name)
        assert status == 404 and out["error_type"] == "validation" and "not loaded" in out["error"]
    assert call("GET", f"{url}/v1/adapters/team/zed")[0] == 404


def test_load_errors_are_4xx_with_error_type(live_server: LiveServer, tiny_assets, tmp_path: Path) -> None:
    url = f"{live_server.url}/v1/load_lora_adapter"
    status, _, out = call("POST", url, {"lora_name": "ghost", "lora_path": str(tmp_path / "missing")})
    assert status == 404 and out["error_type"] == "adapter_not_found"
    status, _, out = call("POST", url, {"lora_name": "bad name!", "lora_path": "/x"})
    assert status == 422 and out["error_type"] == "validation" and "lora_name" in out["error"]
    status, _, out = call("POST", url, {"lora_name": "x", "lora_path": "/x", "sha256": "abc"})
    assert status == 422 and "sha256" in out["error"]
    status, _, out = call("POST", url, {"lora_path": "/x"})
    assert status == 422 and "lora_name" in out["error"]
    # a real PEFT directory that is not plain LoRA (DoRA) is refused as unsupported
    dora = tmp_path / "dora"
    shutil.copytree(tiny_assets.adapters["llama"]["a4"], dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    status, _, out = call("POST", url, {"lora_name": "dora", "lora_path": str(dora)})
    assert status == 422 and out["error_type"] == "unsupported", out
    # failed loads are reported, and never served
    status, _, listed = call("GET", f"{live_server.url}/v1/adapters/dora")
    assert status == 200 and listed["state"] == "failed" and listed["error"]
    status, out = _generate(live_server, "dora")
    assert status == 404 and out["error_type"] == "validation" and "dora" in out["error"]
    for name in ("ghost", "dora"):  # forget the failures: the shared server's list stays clean
        assert call("POST", f"{live_server.url}/v1/unload_lora_adapter", {"lora_name": name})[0] == 200


def test_unload_unknown_is_404(live_server: LiveServer) -> None:
    status, _, out = call("POST", f"{live_server.url}/v1/unload_lora_adapter", {"lora_name": "nope"})
    assert status == 404 and out["error_type"] == "adapter_not_found"


def test_ready_reports_failed_startup_adapters(live_server: LiveServer, server_thread: ServerThread) -> None:
    settings = ServerSettings(startup_adapters=(LoadAdapterSpec("broken", "/nonexistent/adapter"),))
    url = server_thread.start(create_app(live_server.engine, settings))
    deadline = time.monotonic() + 30
    while (status := call("GET", f"{url}/ready"))[0] != 200 and time.monotonic() < deadline:
        assert status[0] == 503 and status[2]["ready"] is False
        time.sleep(0.02)
    _, _, body = call("GET", f"{url}/ready")
    assert body["ready"] is True and set(body["failed_adapters"]) == {"broken"}
    assert call("GET", f"{url}/health")[0] == 200
    assert call("POST", f"{url}/v1/unload_lora_adapter", {"lora_name": "broken"})[0] == 200


def test_model_card(live_server: LiveServer) -> None:
    status, _, card = call("GET", f"{live_server.url}/v1/models/c16")
    assert status == 200 and (card["id"], card["parent"]) == ("c16", "tiny-llama")
    status, _, out = call("GET", f"{live_server.url}/v1/models/nope")
    assert status == 404 and out["error"]["code"] == "model_not_found"


def test_adapter_still_loading_is_503_and_server_not_ready(server_thread: ServerThread, tiny_assets) -> None:
    gate = threading.Event()

    def gated_loader(spec: LoadAdapterSpec, model_config: Any, max_rank: int) -> Any:
        gate.wait(30)  # holds the load in its worker thread, as a slow download would
        return load_local_adapter(spec, model_config, max_rank)

    config = EngineConfig(model_path=str(tiny_assets.models["llama"]))
    engine = AsyncEngine.from_config(config, adapter_loader=gated_loader)
    spec = LoadAdapterSpec("slow", str(tiny_assets.adapters["llama"]["a4"]))
    url = server_thread.start(create_app(engine, ServerSettings(startup_adapters=(spec,))))
    try:
        deadline = time.monotonic() + 30
        while call("GET", f"{url}/v1/adapters/slow")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert call("GET", f"{url}/v1/adapters/slow")[2]["state"] == "loading"
        assert call("GET", f"{url}/ready")[0] == 503
        status, headers, out = call(
            "POST", f"{url}/generate", {"inputs": "hi", "parameters": {"adapter_id": "slow"}}
        )
        assert (status, out["error_type"], headers["Retry-After"]) == (503, "overloaded", "1")  # TGI's name
        assert "still loading" in out["error"]
        status, _, out = call(
            "POST", f"{url}/v1/completions", {"model": "slow", "prompt": "hi", "max_tokens": 2}
        )
        assert status == 503 and out["error"]["code"] == "adapter_loading"
        gate.set()
        while call("GET", f"{url}/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        status, _, out = call(
            "POST", f"{url}/generate", {"inputs": "hi", "parameters": {"adapter_id": "slow"}}
        )
        assert status == 200, out
    finally:
        gate.set()
        server_thread.run(engine.shutdown(timeout_s=2.0))


def test_list_since_answers_what_changed(live_server: LiveServer, tiny_assets) -> None:
    """`?since=` from an earlier answer: the adapters changed since (a load, tokens served) and
    the names unloaded; another instance's cursor gets the full list; a malformed one 422."""
    url = f"{live_server.url}/v1/adapters"
    status, _, first = call("GET", url)
    assert status == 200 and first["full"] is True and first["removed"] == []
    since = f"{first['instance']}:{first['revision']}"
    assert call("GET", f"{url}?since={since}")[2]["data"] == []
    body = {"lora_name": "delta", "lora_path": str(tiny_assets.adapters["llama"]["b8"])}
    assert call("POST", f"{live_server.url}/v1/load_lora_adapter", body)[0] == 200
    try:
        assert _generate(live_server, "b8")[0] == 200
        status, _, changed = call("GET", f"{url}?since={since}")
        assert status == 200 and changed["full"] is False
        by_name = {a["name"]: a for a in changed["data"]}
        assert {"delta", "b8"} <= set(by_name)
        assert set(by_name["delta"]) == FIELDS and by_name["b8"]["generated_tokens"] > 0
        before = {a["name"]: a for a in first["data"]}
        now = {a["name"]: a for a in call("GET", url)[2]["data"]}
        for name, report in now.items():  # left out: unchanged; sent: changed, as it is now
            assert report == (by_name[name] if name in by_name else before[name])
            assert name not in by_name or before.get(name) != report
        since = f"{changed['instance']}:{changed['revision']}"
    finally:
        assert call("POST", f"{live_server.url}/v1/unload_lora_adapter", {"lora_name": "delta"})[0] == 200
    status, _, gone = call("GET", f"{url}?since={since}")
    assert (gone["data"], gone["removed"]) == ([], ["delta"])
    status, _, other = call("GET", f"{url}?since=another-process:{gone['revision']}")
    assert other["full"] is True and {a["name"] for a in other["data"]} >= {"b8", "c16"}
    status, _, out = call("GET", f"{url}?since=nonsense")
    assert status == 422 and "since" in out["error"]
